"""Shared setup for every test directory.

Under pytest-xdist (the README runs ``-n 2``) each worker gets an equal share of the machine's cores for torch's
intra-op threads, so that the workers' threads do not compete for the same cores.

The real-model tests load the same GGUF file many times (in both workers and in subprocesses); unless
``LTRI_GGUF_CACHE`` is set already, its converted copy is kept where the CLI keeps it (the model cache's
``converted/``), so the ~80 s conversion happens once (see ``ltri_rag.load_model``'s ``gguf_cache``).
"""

import os

import torch

from ltri_rag.models import default_cache_dir

os.environ.setdefault("LTRI_GGUF_CACHE", str(default_cache_dir() / "converted"))

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
