"""Run on the H200 in session 29 (as ``python3 <this file>``, repository on PYTHONPATH), when these settings
lived in ``kernels/triton_scoring.py``; updated to ``kernels/scoring_launch.py``.
Chunk scoring launch settings with the padding rows loaded (CHUNK_LOAD_PADDING) and masked."""
import torch
from ltri_rag.kernels import scoring_launch as launch
from ltri_rag.kernels import triton_scoring as ts
from ltri_rag.kernels.scoring import span_layout, span_probabilities
from benchmarks.bench_local_attention import _time

gen = torch.Generator().manual_seed(0)
settings = [(64, 128, 4, 3), (64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 4),
            (64, 32, 4, 4), (64, 128, 4, 2), (32, 128, 4, 3), (64, 256, 8, 3), (128, 64, 8, 3)]
for num_spans in (2000, 16000):
    counts = torch.randint(4, 9, (num_spans,), generator=gen)
    owner = torch.repeat_interleave(torch.arange(num_spans), counts).cuda()
    q = (torch.randn(32, 256, 128, generator=gen) * 2).cuda().bfloat16()
    v = torch.randn(owner.numel(), 8, 128, generator=gen).cuda().bfloat16()
    layout = span_layout(v, owner, num_spans, dtype=torch.bfloat16)
    ref = span_probabilities(q.float(), v.float(), owner, num_spans, 128 ** -0.5)
    for flag in (True, False):
        launch.CHUNK_LOAD_PADDING = flag
        for bm, bs, w, st in settings:
            fn = lambda: ts.span_probabilities_triton(q, v, owner, num_spans, 128 ** -0.5, layout=layout,
                                                      block_m=bm, block_s=bs, num_warps=w, num_stages=st)
            try:
                err = float((fn() - ref).abs().max())
                print(f"S={num_spans} padding={flag} m{bm} s{bs} w{w} st{st}: {_time(fn, 30, True):.4f} ms "
                      f"err {err:.1e}", flush=True)
            except Exception as error:  # noqa: BLE001
                print(f"S={num_spans} padding={flag} m{bm} s{bs} w{w} st{st}: failed {type(error).__name__}",
                      flush=True)
    launch.CHUNK_LOAD_PADDING = True
    fn = lambda: ts.span_probabilities_triton(q, v, owner, num_spans, 128 ** -0.5, layout=layout)
    print(f"S={num_spans} new default: {_time(fn, 30, True):.4f} ms", flush=True)
    fn0 = lambda: ts.span_probabilities_triton(q, v, owner, num_spans, 128 ** -0.5, layout=layout, score_buffer=0,
                                               block_m=128, block_s=64, num_warps=8, num_stages=2)
    launch.CHUNK_LOAD_PADDING = False
    print(f"S={num_spans} session 28 (recomputed, 128x64 w8 st2, masked): {_time(fn0, 30, True):.4f} ms", flush=True)
