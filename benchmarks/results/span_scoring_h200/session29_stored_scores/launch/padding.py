"""Run on the H200 in session 29 (as ``python3 <this file>``, repository on PYTHONPATH), when these settings
lived in ``kernels/triton_scoring.py``; updated to ``kernels/scoring_launch.py``.
Slot loads masked by the valid bits (current) against loads of every span's row (padding included)."""
import sys
import torch
from ltri_rag.kernels import scoring_launch as launch
from ltri_rag.kernels import triton_scoring as ts
from ltri_rag.kernels.scoring import span_layout, span_probabilities
from benchmarks.bench_local_attention import _time

cuda = torch.cuda.is_available()
dev = "cuda" if cuda else "cpu"
shapes = [(2000, 256), (16000, 256), (4000, 1), (16000, 1), (64000, 1)] if cuda else [(40, 16), (40, 1)]
heads, kv, dim = (32, 8, 128) if cuda else (8, 2, 32)
gen = torch.Generator().manual_seed(0)
for num_spans, q_len in shapes:
    counts = torch.randint(4, 9, (num_spans,), generator=gen)
    owner = torch.repeat_interleave(torch.arange(num_spans), counts).to(dev)
    dt = torch.bfloat16 if cuda else torch.float32
    q = (torch.randn(heads, q_len, dim, generator=gen) * 2).to(dev, dt)
    v = torch.randn(owner.numel(), kv, dim, generator=gen).to(dev, dt)
    ref = span_probabilities(q.float(), v.float(), owner, num_spans, dim ** -0.5)
    for kind, layout in (("bf16", span_layout(v, owner, num_spans, dtype=dt)),
                         ("int8", span_layout(v, owner, num_spans, quantize=True))):
        fn = lambda: ts.span_probabilities_triton(q, v, owner, num_spans, dim ** -0.5, layout=layout)
        for flag in (False, True):
            launch.CHUNK_LOAD_PADDING = launch.DECODE_LOAD_PADDING = flag
            got = fn()
            err = float((got - ref).abs().max())
            ms = _time(fn, 30, cuda) if cuda else 0.0
            print(f"S={num_spans} q={q_len} {kind} load_padding={flag}: {ms:.4f} ms err {err:.1e}", flush=True)
if cuda:  # the chunk kernel's pipelining depth with the padding loaded (the mask no longer waits on a load)
    num_spans, q_len = 16000, 256
    counts = torch.randint(4, 9, (num_spans,), generator=gen)
    owner = torch.repeat_interleave(torch.arange(num_spans), counts).to(dev)
    q = (torch.randn(heads, q_len, dim, generator=gen) * 2).to(dev, torch.bfloat16)
    v = torch.randn(owner.numel(), kv, dim, generator=gen).to(dev, torch.bfloat16)
    layout = span_layout(v, owner, num_spans, dtype=torch.bfloat16)
    for flag in (False, True):
        launch.CHUNK_LOAD_PADDING = flag
        for bm, bs, w, st in [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 128, 4, 3)]:
            fn = lambda: ts.span_probabilities_triton(q, v, owner, num_spans, dim ** -0.5, layout=layout,
                                                      block_m=bm, block_s=bs, num_warps=w, num_stages=st)
            try:
                print(f"S=16000 q=256 load_padding={flag} m{bm} s{bs} w{w} st{st}: {_time(fn, 30, True):.4f} ms",
                      flush=True)
            except Exception as error:  # noqa: BLE001
                print(f"m{bm} s{bs} w{w} st{st}: failed {type(error).__name__}", flush=True)
