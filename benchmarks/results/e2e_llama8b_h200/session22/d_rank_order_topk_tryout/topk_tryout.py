import torch, statistics
dev = torch.device("cuda")
def graph_time(fn, n=32, reps=20):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n): fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1e3 / n)
    return statistics.median(ts)
budget, tail = 2048, 64
for S in (2048, 4096, 16384, 65536):
    for rows in (1, 8):
        gen = torch.Generator(device=dev).manual_seed(0)
        keys = torch.randn(rows, S, device=dev, generator=gen)
        keys[:, ::7] = -3.0  # ties
        lengths = torch.randint(1, 65, (S,), device=dev, generator=gen)
        k = min(S, budget + tail)
        def sort_path():
            order = torch.argsort(keys, dim=1, descending=True, stable=True)
            ranked = lengths[order]
            return order, ranked, torch.cumsum(ranked, dim=1, dtype=torch.int64)
        idx = torch.arange(S, device=dev)
        def topk_path():
            bits = (keys + 0.0).view(torch.int32)
            sortable = bits ^ ((bits >> 31) & 0x7FFFFFFF)
            comp = (sortable.to(torch.int64) << 32) | (S - 1 - idx)
            top = comp.topk(k, dim=1).values
            order = (S - 1) - (top & 0xFFFFFFFF)
            ranked = lengths[order]
            return order, ranked, torch.cumsum(ranked, dim=1, dtype=torch.int64)
        a, b = sort_path(), topk_path()
        same = torch.equal(a[0][:, :k], b[0])
        ts, tt = graph_time(sort_path), graph_time(topk_path)
        print(f"S={S:6d} rows={rows} k={k}: sort {ts:6.1f} us  topk {tt:6.1f} us  same order {same}", flush=True)
