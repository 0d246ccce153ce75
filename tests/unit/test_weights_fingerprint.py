"""The weights part of a store's fingerprint: version 2 covers every value (version 1 sampled 256 per parameter),
gives the same bytes whatever the summation order, and stores written under version 1 still open under it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ltri_rag.storage import SqlSpanStore

from ltri_rag import KVMemory, LtriConfig
from ltri_rag import memory_fingerprint as mf
from ltri_rag.memory_ingest import sink_prefix_ids
from ltri_rag.store import FingerprintMismatch
from tests.unit.tiny_models import tiny_model
from tests.unit.tiny_tokenizer import tiny_tokenizer

CONFIG = LtriConfig(num_sink_tokens=4, local_window=16, chunk_size=8, budget=12, page_size=5, evict_stride=4,
                    span_min_len=2, span_max_len=6)


def _reference_signatures(values: torch.Tensor) -> np.ndarray:
    """Version 2's block signatures in plain int64 arithmetic: per block of 4,096 bfloat16 bit patterns ``b_i``,
    ``sum(b_i)`` and ``sum((i + 1) * b_i)``."""
    bits = values.to(torch.bfloat16).view(torch.int16).numpy().astype(np.int64)
    rows = []
    for start in range(0, bits.size, 4096):
        block = bits[start:start + 4096]
        rows.append((block.sum(), (block * np.arange(1, block.size + 1)).sum()))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


@pytest.mark.parametrize("numel", [1, 4095, 4096, 3 * 4096 + 17, 5 * 4096])
def test_block_signatures_equal_integer_arithmetic_across_chunks(numel, monkeypatch) -> None:
    monkeypatch.setattr(mf, "_CHUNK", 2 * 4096)  # several chunks, a tail block in the last one
    values = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 50  # exponents up to bf16's large
    got = np.frombuffer(mf._block_signatures(values), dtype=np.int64).reshape(-1, 2)
    np.testing.assert_array_equal(got, _reference_signatures(values))
    assert mf._block_signatures(values[:0]) == b""


def test_version_2_sees_a_changed_tail_value_and_a_swap_that_version_1_misses() -> None:
    model = tiny_model("llama")
    v1, v2 = mf.weights_sha256(model, 1), mf.weights_sha256(model)
    embed = model.get_input_embeddings().weight  # [256, 64]: version 1 samples every 64th value up to 16,320
    with torch.no_grad():
        embed[-1, -1] += 0.5  # the last value of the last row (a retrained special-token row, in little)
    assert mf.weights_sha256(model, 1) == v1  # the weakness version 2 fixes
    changed = mf.weights_sha256(model)
    assert changed != v2
    with torch.no_grad():
        embed[-1, -1] -= 0.5
    assert mf.weights_sha256(model) == v2  # recomputed after the in-place change (version counters), not cached
    with torch.no_grad():
        row = embed[-2].clone()
        embed[-2, 3], embed[-2, 5] = row[5], row[3]  # two values swapped within one block
    assert mf.weights_sha256(model) not in (v2, changed)
    assert mf.weights_sha256(model, 1) == v1


def test_version_2_ignores_the_load_dtype_and_names_each_parameter() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # weights that bfloat16 holds exactly, as a bf16 checkpoint's
    as_bf16 = tiny_model("llama").to(torch.bfloat16)
    as_bf16.load_state_dict(model.state_dict())
    assert mf.weights_sha256(as_bf16) == mf.weights_sha256(model)
    assert mf.weights_sha256(tiny_model("llama", seed=1)) != mf.weights_sha256(model)
    replaced = tiny_model("llama")
    before = mf.weights_sha256(replaced)
    replaced.lm_head.weight = torch.nn.Parameter(replaced.lm_head.weight.detach() * 2)  # a new tensor, not in place
    assert mf.weights_sha256(replaced) != before
    with pytest.raises(ValueError, match="version must be 1 or 2, got 3"):
        mf.weights_sha256(model, 3)


def test_a_store_written_under_version_1_opens_and_refuses_under_version_1(tmp_path) -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    sinks = sink_prefix_ids(tok, CONFIG.num_sink_tokens)
    old = mf.memory_fingerprint(model, tok, CONFIG, sinks, weights_version=1)
    assert "model.weights_version" not in old  # exactly the fingerprint stores were written with before version 2
    SqlSpanStore.create(tmp_path / "old", old).close()
    for config in (None, CONFIG):  # the store's own config, or the caller's (the retried comparison)
        with KVMemory.open(tmp_path / "old", model, tok, config, store=SqlSpanStore) as mem:
            assert mem.fingerprint == old and mem.store.fingerprint == old
    other = tiny_model("llama", seed=1)
    for config in (None, CONFIG):
        with pytest.raises(FingerprintMismatch) as err:
            KVMemory.open(tmp_path / "old", other, tok, config, store=SqlSpanStore)
        assert set(err.value.differences) == {"model.weights_sha256"}
    with KVMemory.create(tmp_path / "new", model, tok, CONFIG, store=SqlSpanStore) as mem:
        assert mem.fingerprint["model.weights_version"] == 2
        assert mem.fingerprint["model.weights_sha256"] == mf.weights_sha256(model) != old["model.weights_sha256"]
    with pytest.raises(FingerprintMismatch) as err:
        KVMemory.open(tmp_path / "new", other, tok, CONFIG, store=SqlSpanStore)
    assert set(err.value.differences) == {"model.weights_sha256"}


def test_a_store_of_an_unknown_weights_version_is_refused_naming_it(tmp_path) -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    sinks = sink_prefix_ids(tok, CONFIG.num_sink_tokens)
    newer = mf.memory_fingerprint(model, tok, CONFIG, sinks)
    newer = type(newer)({**dict(newer.items()), "model.weights_version": 3})
    SqlSpanStore.create(tmp_path / "m", newer).close()
    with pytest.raises(FingerprintMismatch) as err:
        KVMemory.open(tmp_path / "m", model, tok, CONFIG, store=SqlSpanStore)
    assert err.value.differences["model.weights_version"] == (3, 2)
    with pytest.raises(ValueError, match="version 3"):
        KVMemory.open(tmp_path / "m", model, tok, store=SqlSpanStore)
    SqlSpanStore.open(tmp_path / "m", None).close()  # both refusals closed the store: a writer can open it
