"""Measuring one prompt: greedy answer, prefill / decode time, peak GPU memory (shared by the benchmarks)."""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ltri_rag
from ltri_rag import LtriConfig, LtriSession
from ltri_rag.generation import eos_token_ids

__all__ = ["file_sha256", "median_seconds", "run_prompt"]


def median_seconds(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time of ``reps`` calls of ``fn`` after one warm-up call (host code: no device synchronisation)."""
    fn()
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def file_sha256(path: str) -> str | None:
    """sha256 of a model file (None for Hub ids and directories)."""
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    digest = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def run_prompt(model: Any, tokenizer: Any, prompt: str | torch.Tensor, config: LtriConfig,
               max_new: int) -> dict[str, Any]:
    """Greedy answer to ``prompt`` (text, or token ids ``[seq_len]``): prediction, prefill/decode seconds, peak GPU
    bytes, token counts. Decoding stops at an end-of-sequence token."""
    device = next(model.parameters()).device
    ids = prompt if isinstance(prompt, torch.Tensor) else ltri_rag.encode_prompt(tokenizer, prompt)
    eos = eos_token_ids(model, tokenizer)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    session = LtriSession(model, config)
    logits = session.feed(ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    prefill_s = time.perf_counter() - start
    out: list[int] = []
    for _ in range(max_new):
        token = int(logits[0].argmax())
        if token in eos:
            break
        out.append(token)
        if len(out) < max_new:  # the last kept token needs no step after it
            logits = session.step(torch.tensor([token]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    total_s = time.perf_counter() - start
    return {"prediction": tokenizer.decode(out, skip_special_tokens=True), "prefill_s": prefill_s,
            "decode_s": total_s - prefill_s, "prompt_tokens": int(ids.numel()),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
            "usage": session.usage()}
