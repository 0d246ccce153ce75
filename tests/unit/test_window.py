"""The window's in-place buffers (:mod:`ltri_rag.window`) against plain concatenation and slicing, and the layer's
window staying at one address while it is evicted and refilled."""

from __future__ import annotations

import random

import pytest
import torch

from ltri_rag import LtriConfig, LtriSession
from ltri_rag.window import WindowBuffer
from tests.unit.tiny_models import random_ids, tiny_model


@pytest.mark.parametrize("dim", [1, 2])
def test_buffer_follows_cat_and_slice(dim: int) -> None:
    rng = random.Random(0)
    buf = WindowBuffer(dim)
    expected = None
    for step in range(300):
        shape = [2, 3, 5]
        shape[dim] = rng.choice([1, 1, 1, 4, 17])
        new = torch.randn(*shape)
        action = rng.random()
        if action < 0.55:
            view = buf.append(new)
            expected = new if expected is None else torch.cat([expected, new], dim)
        elif action < 0.75:
            staged = buf.stage(new)  # what attention reads; not counted in
            ref = new if expected is None else torch.cat([expected, new], dim)
            assert torch.equal(staged, ref)
            view = buf.view
        elif action < 0.9 and expected is not None:
            n = rng.randint(0, expected.shape[dim])
            view = buf.drop_front(n)
            expected = expected.narrow(dim, n, expected.shape[dim] - n)
        elif expected is not None:
            length = expected.shape[dim]
            start = rng.randint(0, length)
            n = rng.randint(0, length - start)
            view = buf.remove(start, n)
            expected = torch.cat([expected.narrow(dim, 0, start), expected.narrow(dim, start + n, length - start - n)],
                                 dim)
        else:
            continue
        assert torch.equal(view, expected), step
        assert buf.length == expected.shape[dim] <= buf.capacity


def test_buffer_keeps_its_address_once_large_enough() -> None:
    buf = WindowBuffer(2)
    buf.append(torch.randn(1, 2, 100, 4))
    address = buf.storage.data_ptr()
    for _ in range(50):  # a decode-like cycle: one token at a time, then the oldest 16 dropped
        for _ in range(16):
            buf.append(torch.randn(1, 2, 1, 4))
        buf.drop_front(16)
    assert buf.storage.data_ptr() == address and buf.length == 100


def test_bad_counts_are_named() -> None:
    buf = WindowBuffer(1)
    buf.append(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="cannot drop 4 of 3 entries"):
        buf.drop_front(4)
    with pytest.raises(ValueError, match=r"cannot remove \[2, 4\) of 3 entries"):
        buf.remove(2, 2)
    with pytest.raises(ValueError, match="cannot advance"):
        buf.advance(buf.capacity)


def test_layer_window_stays_in_place_while_decoding() -> None:
    """After the prompt, decoding evicts and refills the window without moving it (what a captured decode step
    needs; that the results are unchanged is test_exactness's and test_engine's)."""
    model = tiny_model("llama")
    cfg = LtriConfig(mode="ltri", local_window=32, chunk_size=16, budget=16, num_sink_tokens=4, evict_stride=8,
                     span_min_len=2, span_max_len=8, page_size=8)
    ids = random_ids(1, 80)
    session = LtriSession(model, cfg)
    session.feed(ids)
    states = [s for s in session.cache.states if hasattr(s, "_win_buffers")]
    token = torch.zeros(1, dtype=torch.int64)
    session.step(token)
    addresses = [s._win_buffers[0].storage.data_ptr() for s in states]
    for _ in range(40):  # five evictions
        session.step(token)
    assert [s._win_buffers[0].storage.data_ptr() for s in states] == addresses
    assert all(s.win_k.data_ptr() == a for s, a in zip(states, addresses))
