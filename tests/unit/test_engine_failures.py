"""The engine at the edges found by review: memory imported into a session without sinks, a failure while a pass
commits, a failed full-mode pass, an import before the sinks are read, a model spread over devices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ltri_rag.eviction as eviction
from ltri_rag import LtriConfig, LtriSession
from ltri_rag.cache import MemoryExport
from tests.unit.tiny_models import exact_config, random_ids, reference_logits, tiny_model


def test_memory_imported_into_a_session_without_sinks_is_exact() -> None:
    _imported_without_sinks("torch")


def test_memory_imported_into_a_session_without_sinks_is_exact_with_the_triton_kernels() -> None:
    """The same through the Triton backend (its own assembly path), under the interpreter in a fresh process (the
    kernel modules read TRITON_INTERPRET when first imported)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        _imported_without_sinks("triton")
        return
    code = ("from tests.unit.test_engine_failures import _imported_without_sinks; "
            "_imported_without_sinks('triton'); print('exact')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and "exact" in done.stdout, done.stderr[-3000:]


def _imported_without_sinks(backend: str) -> None:
    """No sinks configured and nothing read yet: the first pass after an import has spans but neither sinks nor a
    window to take the K/V shape from (it crashed); with every span in budget it equals the unmodified model."""
    model = tiny_model("llama")
    ids = random_ids(1, 90)
    cfg = exact_config("ltri", 7, num_sink_tokens=0, attention_backend=backend)
    first = LtriSession(model, cfg)
    first.feed(ids[:, :60])
    first.flush()
    second = LtriSession(model, cfg)
    second.import_memory(first.export_memory())
    out = second.feed(ids[:, 60:], return_all_logits=True)
    torch.testing.assert_close(out, reference_logits(model, ids)[:, 60:], atol=2e-4, rtol=0)


def test_a_failure_while_committing_is_reported_not_a_stuck_step(monkeypatch) -> None:
    model = tiny_model("llama")
    ids = random_ids(1, 40)
    session = LtriSession(model, exact_config("ltri", 5, lookahead=False))
    session.feed(ids[:, :30])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eviction, "cut_segments", interrupted)
    with pytest.raises(KeyboardInterrupt):
        session.feed(ids[:, 30:35])
    monkeypatch.undo()
    for call in (lambda: session.feed(ids[:, 30:35]), lambda: session.step(ids[:, 35]), session.flush):
        with pytest.raises(RuntimeError, match="part-committed by an error while committing.*KeyboardInterrupt"):
            call()


def test_a_failed_full_mode_pass_leaves_no_keys_behind() -> None:
    """A pass interrupted after some layers appended their K/V to the transformers cache: they are taken back, so
    feeding the chunk again is exact (the interruption here is in layer 1, after layer 0 ran)."""
    model = tiny_model("llama")
    ids = random_ids(1, 30)
    session = LtriSession(model, LtriConfig(mode="full"))
    session.feed(ids[:, :20])
    mlp = model.model.layers[1].mlp
    original = mlp.forward
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    mlp.forward = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            session.feed(ids[:, 20:])
        assert session.num_tokens == 20 and session.cache.get_seq_length(0) == 20
        out = session.feed(ids[:, 20:], return_all_logits=True)
    finally:
        mlp.forward = original
    torch.testing.assert_close(out, reference_logits(model, ids)[:, 20:], atol=2e-4, rtol=0)


def test_memory_cannot_be_imported_before_the_sinks_are_read() -> None:
    model = tiny_model("llama")
    session = LtriSession(model, LtriConfig(mode="ltri", num_sink_tokens=3, local_window=64, chunk_size=8))
    empty = MemoryExport(positions=torch.zeros(0, dtype=torch.int64), layers={})
    with pytest.raises(ValueError, match="needs the 3 sink tokens read first, 0 are"):
        session.import_memory(empty, advance=50)


def test_a_model_spread_over_devices_is_refused_naming_them(tmp_path) -> None:
    """A model whose parameters are not all on one device (a ``device_map`` placement, an offload, weights not
    loaded) is refused by the session and by ``KVMemory.create`` / ``open`` with the devices named, before any
    store is created or opened; a model without parameters is refused too."""
    from ltri_rag import KVMemory
    from ltri_rag.storage import SqlSpanStore
    from tests.unit.tiny_tokenizer import tiny_tokenizer

    model = tiny_model("llama")
    config = LtriConfig(num_sink_tokens=4, local_window=16, chunk_size=8, budget=12, page_size=5)
    KVMemory.create(tmp_path / "kept", model, tiny_tokenizer(), config, store=SqlSpanStore).close()
    model.model.layers[1].to("meta")  # the second layer "elsewhere": no data, another device
    with pytest.raises(ValueError, match=r"on cpu, meta: ltri_rag runs a model on one device"):
        LtriSession(model, config)
    with pytest.raises(ValueError, match=r"on cpu, meta"):
        KVMemory.create(tmp_path / "new", model, tiny_tokenizer(), config, store=SqlSpanStore)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match=r"on cpu, meta"):
        KVMemory.open(tmp_path / "kept", model, tiny_tokenizer(), store=SqlSpanStore)
    model.to("meta")  # nothing loaded at all
    with pytest.raises(ValueError, match=r"on meta: ltri_rag runs a model on one device"):
        LtriSession(model, config)
    with pytest.raises(ValueError, match="has no parameters"):
        LtriSession(torch.nn.Module(), config)
