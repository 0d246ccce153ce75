"""``benchmarks.bench_cpu_decode``: the switch it alternates, named on the command line, and put back afterwards."""

from __future__ import annotations

import pytest
import torch

import ltri_rag.layer_memory as layer_memory
from benchmarks import bench_cpu_decode as bench
from tests.unit.tiny_models import VOCAB, tiny_model


def test_flag_names_a_boolean_switch() -> None:
    assert bench._flag(bench.DEFAULT_FLAG) == (layer_memory, "REUSE_PLACED_MEMORY")
    with pytest.raises(ValueError, match="no module 'ltri_rag.nowhere'"):
        bench._flag("ltri_rag.nowhere:X")
    with pytest.raises(ValueError, match="ltri_rag.rope.rotate is not a boolean switch"):  # a function
        bench._flag("ltri_rag.rope:rotate")
    with pytest.raises(SystemExit):
        bench.main(["--model", "unused.gguf", "--flag", "ltri_rag.rope:NOPE", "--out", "unused"])


def test_alternating_session_times_both_settings_and_restores_the_switch(monkeypatch) -> None:
    """Steps alternate the switch segment by segment; the same greedy tokens as a session with it off throughout
    (an exact switch); the switch is back at its value afterwards, also when it started off."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(layer_memory, "REUSE_PLACED_MEMORY", False)
    with torch.no_grad():
        mixed = bench.ltri_decode(model, ids, 8, 2, bench.DEFAULT_FLAG)
        plain = bench.ltri_decode(model, ids, 8, None, bench.DEFAULT_FLAG)
    assert layer_memory.REUSE_PLACED_MEMORY is False
    assert len(mixed["times"][True]) == len(mixed["times"][False]) == 4 and len(plain["times"][False]) == 8
    assert mixed["tokens"] == plain["tokens"] and len(mixed["tokens"]) == 8
