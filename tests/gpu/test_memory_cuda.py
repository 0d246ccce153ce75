"""On CUDA: ``KVMemory`` ingests, retrieves, answers and streams with the model on the GPU, and (float32) agrees with
the same memory on the CPU. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ltri_rag.storage import SqlSpanStore

from ltri_rag import KVMemory
from tests.unit.test_kvmemory import DOCS, META, _config
from tests.unit.tiny_models import tiny_model
from tests.unit.tiny_tokenizer import tiny_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

QUESTION = "Which river flows through the capital of France?"


def _run(model, folder: Path, max_memory_tokens: int) -> tuple[list, str, str]:
    tok = tiny_tokenizer()
    with KVMemory.create(folder, model, tok, _config(), store=SqlSpanStore,
                         max_memory_tokens=max_memory_tokens) as mem:
        mem.add_documents(list(DOCS.values()), [META[k] for k in DOCS], list(DOCS), progress=False)
    with KVMemory.open(folder, model, tok, max_memory_tokens=max_memory_tokens) as mem:
        hits = mem.retrieve(QUESTION, k=3)
        again = mem.retrieve(QUESTION, k=3)  # the second read comes from the document cache
        assert [(h.doc_id, h.token_start, h.token_end) for h in again] == \
            [(h.doc_id, h.token_start, h.token_end) for h in hits]
        answer = mem.generate(QUESTION, max_new_tokens=6)
        if max_memory_tokens < 100:  # the coarse stage chose (one document fits)
            assert len(answer.documents) == 1
        streamed = "".join(mem.stream(QUESTION, max_new_tokens=6))
    return hits, answer.text, streamed


@pytest.mark.parametrize("max_memory_tokens", [1 << 17, 40])  # every document, or the coarse stage chooses them
def test_cuda_memory_agrees_with_the_cpu(tmp_path: Path, max_memory_tokens: int) -> None:
    model = tiny_model("llama")
    cpu_hits, cpu_text, cpu_stream = _run(model, tmp_path / "cpu", max_memory_tokens)
    gpu_hits, gpu_text, gpu_stream = _run(model.cuda(), tmp_path / "gpu", max_memory_tokens)
    assert cpu_hits, "no hits on the CPU"
    assert [(h.doc_id, h.token_start, h.token_end) for h in gpu_hits] == \
        [(h.doc_id, h.token_start, h.token_end) for h in cpu_hits]
    for g, c in zip(gpu_hits, cpu_hits):
        assert g.score == pytest.approx(c.score, abs=1e-4)
    assert gpu_text == cpu_text
    assert gpu_stream == gpu_text and cpu_stream == cpu_text


def test_weights_fingerprint_is_the_same_on_the_gpu_as_on_the_cpu(monkeypatch) -> None:
    """Version 2's block signatures are exact integer sums (a float64 product of bf16 bit patterns), so a store
    written with the model on one device opens with it on another."""
    from ltri_rag import memory_fingerprint as mf

    model = tiny_model("llama")
    on_cpu = {v: mf.weights_sha256(model, v) for v in (1, 2)}
    monkeypatch.setattr(mf, "_CUDA_CHUNK", 2 * 4096)  # several chunks per parameter on the GPU
    model.cuda()
    assert {v: mf.weights_sha256(model, v) for v in (1, 2)} == on_cpu
    values = torch.randn(5 * 4096 + 123, generator=torch.Generator().manual_seed(0)) * 1e3
    assert mf._block_signatures(values.cuda()) == mf._block_signatures(values)
