"""Synthetic documents for the span store tests, and the subprocesses of its crash and concurrency tests.

Run as a script (``python tests/unit/store_worker.py MODE ...``) it loads only the store (``ltri_rag.store`` and
``ltri_rag.storage``), not the model stack ``import ltri_rag`` pulls in (seconds of transformers import per process):

- ``zygote STORE``: imports everything once, then for each stdin line ``RUN_ID START [LOG]`` forks a writer child
  that opens the store and adds / replaces / deletes documents in a loop until killed (logging each call to
  ``LOG``); prints ``pid <pid>`` per child, and the child ``writing <pid>`` once it has opened the store.
  Forking from a warm process makes 20+ SIGKILLs take seconds instead of minutes.
- ``reader STORE SECONDS``: opens read-only and searches in a loop; each hit's document must load completely.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
HEADS, HEAD_DIM, NUM_LAYERS, STORED_LAYERS = 2, 4, 3, (0, 2)


def fingerprint_items(**overrides: object) -> dict:
    items = {"num_layers": NUM_LAYERS, "num_kv_heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float16",
             "model": "tiny-test", "weights_sha256": "ab" * 32, "tokenizer_sha256": "cd" * 32, "index_vectors": 2}
    items.update(overrides)
    return items


def make_doc(doc_id: str, *, collection: str = "default", seed: int = 0, num_tokens: int | None = None,
             metadata: dict | None = None, records: types.ModuleType | None = None):
    """A synthetic document: random fp16 K/V, spans tiling the tokens, 1-3 index vectors per span, per stored layer.

    The text is one character per token, so character offsets equal token offsets.
    """
    store_types = records or sys.modules["ltri_rag.store"]
    g = torch.Generator().manual_seed(seed)
    n = num_tokens or int(torch.randint(8, 40, (1,), generator=g))
    text = "".join(chr(ord("a") + int(c)) for c in torch.randint(0, 26, (n,), generator=g))
    layers = []
    for layer in STORED_LAYERS:
        cuts = sorted(set(torch.randint(1, n, (max(1, n // 6),), generator=g).tolist()))
        starts = torch.tensor([0, *cuts], dtype=torch.int64)
        ends = torch.tensor([*cuts, n], dtype=torch.int64)
        per_span = torch.randint(1, 4, (len(starts),), generator=g)
        owner = torch.repeat_interleave(torch.arange(len(starts)), per_span)
        owner = owner[torch.randperm(len(owner), generator=g)]  # unsorted on purpose
        layers.append(store_types.LayerRecord(
            layer=layer, keys=torch.randn(n, HEADS, HEAD_DIM, generator=g).half(),
            values=torch.randn(n, HEADS, HEAD_DIM, generator=g).half(), token_starts=starts, token_ends=ends,
            char_starts=starts.clone(), char_ends=ends.clone(),
            vectors=torch.randn(len(owner), HEADS, HEAD_DIM, generator=g), owner=owner))
    return store_types.DocumentRecord(doc_id=doc_id, collection=collection, text=text, num_tokens=n,
                                      layers=tuple(layers), metadata=metadata or {"seed": seed})


def load_store_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """Import ``ltri_rag.store`` and ``ltri_rag.storage`` without running ``ltri_rag/__init__.py``."""
    if "ltri_rag" not in sys.modules:
        pkg = types.ModuleType("ltri_rag")
        pkg.__path__ = [str(REPO / "ltri_rag")]
        sys.modules["ltri_rag"] = pkg
    store_types = importlib.import_module("ltri_rag.store")
    spec = importlib.util.spec_from_file_location("ltri_rag.storage", REPO / "storage" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "storage")])
    assert spec is not None and spec.loader is not None
    storage = importlib.util.module_from_spec(spec)
    sys.modules["ltri_rag.storage"] = storage
    spec.loader.exec_module(storage)
    return store_types, storage


def writer_loop(path: str, run_id: int, start: int, data_dir: str | None = None, log: str | None = None) -> None:
    """Add documents forever; every 3rd step also replaces an earlier one, every 5th deletes one. With ``log``, each
    call is logged as a JSON line before it starts (``begin``) and after it returned (``done``: committed), with
    the document id and seed (``seed`` None: a delete), so that a test can tell what a kill may have cut short."""
    store_types, storage = load_store_modules()
    store = storage.SqlSpanStore.open(path, storage.Fingerprint(fingerprint_items()), data_dir=data_dir)
    print(f"writing {os.getpid()}", flush=True)  # opened (and repaired): the writes start now
    out = open(log, "a", buffering=1) if log else None  # line-buffered: each line reaches the file whole

    def logged(ev: str, doc_id: str, seed: int | None) -> None:
        if out is not None:
            out.write(json.dumps({"ev": ev, "id": doc_id, "seed": seed}) + "\n")

    def add(doc_id: str, seed: int) -> None:
        logged("begin", doc_id, seed)
        store.add(make_doc(doc_id, seed=seed, records=store_types))
        logged("done", doc_id, seed)

    i = start
    while True:
        add(f"r{run_id}-d{i}", i)
        if i % 3 == 0 and i > start:
            add(f"r{run_id}-d{i - 1}", 10_000 + i)  # replace
        if i % 5 == 0 and i - 2 > start:
            logged("begin", f"r{run_id}-d{i - 2}", None)
            store.delete([f"r{run_id}-d{i - 2}"])
            logged("done", f"r{run_id}-d{i - 2}", None)
        i += 1


def zygote(path: str, data_dir: str | None = None) -> None:
    load_store_modules()  # warm imports (no FAISS / OpenMP work before fork)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print("zygote-ready", flush=True)
    for line in sys.stdin:
        run_id, start, *log = line.rstrip("\n").split(maxsplit=2)  # RUN_ID START [LOG]
        pid = os.fork()
        if pid == 0:
            try:
                writer_loop(path, int(run_id), int(start), data_dir, log[0] if log else None)
            except Exception as exc:  # noqa: BLE001  a writer that cannot run says so (the test must not wait)
                print(f"failed {os.getpid()} {exc!r}", flush=True)
            finally:
                os._exit(1)
        print(f"pid {pid}", flush=True)


def reader(path: str, seconds: float, data_dir: str | None = None) -> None:
    _, storage = load_store_modules()
    store = storage.SqlSpanStore.open(path, None, read_only=True, data_dir=data_dir)
    g = torch.Generator().manual_seed(os.getpid())
    searches = hits_seen = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for layer in STORED_LAYERS:
            hits = store.search(layer, torch.randn(HEADS, HEAD_DIM, generator=g), k=5)
            for hit in hits:
                loaded = store.load_spans(hit.doc_id, layer, collection=hit.collection)
                info = store.get([hit.doc_id], collection=hit.collection)[0]
                span = loaded.spans[hit.span_idx]
                assert loaded.keys.shape[0] == info.num_tokens and span.token_end <= info.num_tokens
                assert int(loaded.owner.max()) == len(loaded.spans) - 1 and loaded.vectors.shape[0] == len(loaded.owner)
                assert hit.text == info.text[hit.char_start:hit.char_end]
            searches += 1
            hits_seen += len(hits)
    print(json.dumps({"searches": searches, "hits": hits_seen}), flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "zygote":  # zygote PATH_OR_URL [DATA_DIR]
        zygote(sys.argv[2], *sys.argv[3:4])
    elif mode == "reader":  # reader SECONDS PATH_OR_URL [DATA_DIR]
        reader(sys.argv[3], float(sys.argv[2]), *sys.argv[4:5])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
