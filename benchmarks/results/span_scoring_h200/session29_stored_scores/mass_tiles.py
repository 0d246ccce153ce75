"""Run on the H200 in session 29 (as ``python3 <this file>``, repository on PYTHONPATH), when these settings
lived in ``kernels/triton_scoring.py``; updated to ``kernels/scoring_launch.py``.
The stored-score mass kernel's tile, timed inside the whole chunk scoring call (Llama-3-8B heads)."""
import sys
import torch
from ltri_rag.kernels import scoring_launch as launch
from ltri_rag.kernels import triton_scoring as ts
from ltri_rag.kernels.scoring import span_layout
from benchmarks.bench_local_attention import _time

gen = torch.Generator().manual_seed(0)
for num_spans in (2000, 16000):
    counts = torch.randint(4, 9, (num_spans,), generator=gen)
    owner = torch.repeat_interleave(torch.arange(num_spans), counts).cuda()
    q = (torch.randn(32, 256, 128, generator=gen) * 2).cuda().bfloat16()
    v = torch.randn(owner.numel(), 8, 128, generator=gen).cuda().bfloat16()
    layout = span_layout(v, owner, num_spans, dtype=torch.bfloat16)
    fn = lambda **kw: ts.span_probabilities_triton(q, v, owner, num_spans, 128 ** -0.5, layout=layout, **kw)
    base = fn(score_buffer=0)
    print(num_spans, "recomputed", round(_time(lambda: fn(score_buffer=0), 30, True), 4), flush=True)
    for tile in [(16, 256, 4), (8, 256, 4), (32, 128, 4), (16, 512, 4), (16, 1024, 8), (32, 256, 8), (4, 1024, 4)]:
        launch.MASS_TILE = tile
        got = fn()
        err = float((got - base).abs().max())
        print(num_spans, tile, round(_time(fn, 30, True), 4), "err", err, flush=True)
