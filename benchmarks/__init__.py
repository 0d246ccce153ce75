"""Benchmarks of ltri-rag (each module's docstring has its command)."""

import os

# PyTorch's profiler leaves CUPTI attached once a profiled region ends, and whatever runs later in the process is
# slower: in one bench_e2e call the mode measured after another mode's profile decoded 3-4 ms per token slower at 128K
# than the same code paths measured first (session 24: 13.1 / 16.9 and 13.5 / 16.6 ms in either order; 14.7 / 15.3
# with the profiles off). With "1" CUPTI is finalised when profiling stops (CUDA >= 12.6; torch turns it off by itself
# for older CUDA with CUDA graphs, where a re-initialisation could crash). That left a 2.0 ms gap (13.1 / 15.1), so
# bench_e2e also runs each mode in a process of its own on CUDA (benchmarks.e2e.isolate).
os.environ.setdefault("TEARDOWN_CUPTI", "1")
