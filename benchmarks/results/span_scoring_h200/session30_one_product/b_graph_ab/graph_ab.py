"""Session 30: the span scorer's one-product tiles against slot-by-slot, each call replayed in a CUDA graph (no
host launch cost in the times), settings interleaved over rounds; Llama-3-8B heads, bf16 kept layouts."""
import json
import statistics
import sys

import torch
from ltri_rag.kernels import triton_scoring as ts
from ltri_rag.kernels.scoring import span_layout

out = sys.argv[1]
torch.manual_seed(0)


def make(spans, q_len):
    gen = torch.Generator().manual_seed(spans + q_len)
    counts = torch.randint(4, 9, (spans,), generator=gen)
    owner = torch.repeat_interleave(torch.arange(spans), counts).cuda()
    q = (torch.randn(32, q_len, 128, generator=gen) * 2).cuda().bfloat16()
    v = torch.randn(owner.numel(), 8, 128, generator=gen).cuda().bfloat16()
    return q, v, owner, span_layout(v, owner, spans, dtype=torch.bfloat16), span_layout(v, owner, spans, quantize=True)


def graph_ms(fn, reps, inner=10):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (reps * inner)


rows = []
for q_len, span_counts, settings in (
        (256, (2000, 8000, 16000), {
            "slot-by-slot default": {},
            "one product m64 s16 w4 st2": dict(one_product=True),
            "one product m128 s16 w4 st2": dict(one_product=True, block_m=128, block_s=16, num_warps=4, num_stages=2),
            "one product m64 s16 w4 st3": dict(one_product=True, block_m=64, block_s=16, num_warps=4, num_stages=3),
            "one product m64 s32 w8 st3": dict(one_product=True, block_m=64, block_s=32, num_warps=8, num_stages=3),
            "slot m128 s64 w8 st3": dict(block_m=128, block_s=64, num_warps=8, num_stages=3)}),
        (1, (2000, 4000, 16000, 64000), {
            "slot-by-slot default": {},
            "int8 default": dict(int8=True),
            "one product s16 w4 st2": dict(one_product=True, block_s=16, num_warps=4, num_stages=2),
            "one product s16 w4 st3": dict(one_product=True, block_s=16, num_warps=4, num_stages=3),
            "one product s16 w8 st3": dict(one_product=True, block_s=16, num_warps=8, num_stages=3),
            "one product s32 w4 st2": dict(one_product=True, block_s=32, num_warps=4, num_stages=2),
            "one product s32 w8 st3": dict(one_product=True, block_s=32, num_warps=8, num_stages=3),
            "one product int8 s16 w4 st2": dict(int8=True, one_product=True, block_s=16, num_warps=4,
                                                num_stages=2)})):
    for spans in span_counts:
        q, v, owner, layout, codes = make(spans, q_len)
        times = {name: [] for name in settings}
        fns = {}
        for name, kw in settings.items():
            kw = dict(kw)
            kept = codes if kw.pop("int8", False) else layout
            fns[name] = (lambda k=kept, a=kw: ts.span_probabilities_triton(q, None, None, spans, 0.088, layout=k,
                                                                              **a))
            ref = ts.span_probabilities_triton(q, None, None, spans, 0.088, layout=kept)
            err = float((fns[name]() - ref).abs().max())
            assert err < 1e-5, (name, err)
        reps = 20 if q_len > 1 else 100
        for _ in range(3):
            for name, fn in fns.items():
                times[name].append(graph_ms(fn, reps))
        for name, ts_ in times.items():
            row = {"q_len": q_len, "spans": spans, "setting": name, "ms_median": statistics.median(ts_), "ms": ts_}
            rows.append(row)
            print(f"q={q_len:4d} S={spans:6d} {name:32s} {row['ms_median'] * 1000:9.1f} us  "
                  f"({', '.join(f'{t * 1000:.1f}' for t in ts_)})", flush=True)
json.dump(rows, open(f"{out}/graph_ab.json", "w"), indent=1)
