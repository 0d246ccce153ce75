"""Shared setup for every test directory.

Under pytest-xdist (the README runs ``-n 2``) each worker gets an equal share of the machine's cores for torch's
intra-op threads, so that the workers' threads do not compete for the same cores.
"""

import os

import torch

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
