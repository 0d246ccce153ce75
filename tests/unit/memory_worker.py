"""The writer subprocess of the ``KVMemory`` crash test (``test_kvmemory_crash.py``), and what it shares with the test.

Run as a script, ``python tests/unit/memory_worker.py zygote`` imports the model stack and builds the tiny model and
tokenizer once (seeded: the same weights as the test's, so the store's fingerprint matches), prints ``zygote-ready``,
then for each stdin line ``{"run": RUN_ID, "target": PATH_OR_URL, "data_dir": DATA_DIR or null, "log": LOG_FILE}``
forks a writer child and prints ``pid <pid>``. Forking from a warm process makes 20+ SIGKILLs take seconds instead of
the minutes of importing transformers each time.

A writer child opens the memory and adds documents through ``KVMemory.add_documents`` (1-3 texts per call, lengths
from a few to ~120 tokens, ids drawn from a small pool so that most adds replace a document, some calls
``delete``), forever, until killed. Around every call it appends JSON lines to ``LOG_FILE``, each with a single
``write`` (a kill cannot leave half a line that parses) and the time (``"t"``, ``time.monotonic()``, comparable
across processes):

- ``{"ev": "begin", "op": "add", "collection", "docs": [{"id", "text", "meta"}, ...]}`` or
  ``{"ev": "begin", "op": "delete", "collection", "ids"}`` before the call;
- ``{"ev": "store", "ids"}`` as ``add_documents`` hands a batch to the store (the model work is done then), and
  ``{"ev": "stored"}`` when the store returned;
- ``{"ev": "done"}`` after the call returned;
- ``{"ev": "error", "traceback"}`` if anything raised (the test fails on it).

So a call with ``done`` is complete; the one call begun but not done when the kill came may have stored any of its
documents, each whole or not at all.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
COLLECTIONS = ("a", "b")
ID_POOL = tuple(f"doc{i}" for i in range(6))  # per collection: most adds replace an earlier document
WORDS = ("river", "stone", "garden", "lamp", "Paris", "café", "naïve", "seven", "quiet", "north", "42", "façade",
         "bridge", "winter", "the", "of", "and", "a")


def config_items() -> dict[str, Any]:
    """The memory's engine configuration (as LtriConfig keyword arguments): tiny windows, short spans."""
    return {"mode": "ltri", "num_sink_tokens": 4, "local_window": 16, "chunk_size": 8, "budget": 12, "page_size": 5,
            "evict_stride": 4, "span_min_len": 2, "span_max_len": 6}


def make_text(rng: random.Random) -> str:
    """A short document of random words: 5 to ~120 characters (the tiny tokenizer reads one token per character)."""
    target = rng.choice((5, 20, 40, 80, 120))
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < target:
        words.append(rng.choice(WORDS))
    return " ".join(words) + rng.choice((".", "!", "\n", ""))


def memory_args(target: str, data_dir: str | None) -> tuple[str, dict[str, Any]]:
    """``(path_or_url, store_options)`` for ``KVMemory.create`` / ``open``."""
    return target, ({"data_dir": data_dir} if data_dir else {})


class _Log:
    """Appends JSON lines to a run's log, one ``os.write`` each."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, **event: Any) -> None:
        os.write(self.fd, (json.dumps({**event, "t": time.monotonic()}) + "\n").encode())


class _LoggedStore:
    """A span store that logs each ``add`` as it starts (the model work for its documents is over) and ends."""

    def __init__(self, inner: Any, log: _Log) -> None:
        self._inner, self._log = inner, log

    def add(self, documents: Any) -> list[str]:
        docs = list(documents) if isinstance(documents, (list, tuple)) else [documents]
        self._log(ev="store", ids=[d.doc_id for d in docs])
        out = self._inner.add(documents)
        self._log(ev="stored")
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def writer_loop(model: Any, tok: Any, target: str, data_dir: str | None, log_path: Path, run_id: int) -> None:
    """Open the memory and add / replace / delete documents forever (seeded by ``run_id``)."""
    from ltri_rag.storage import SqlSpanStore

    from ltri_rag import KVMemory

    rng = random.Random(run_id)
    log = _Log(log_path)
    path, store_options = memory_args(target, data_dir)
    # every other run writes each document in its own store transaction (batch_bytes=1), the others one per call
    batch_bytes = 1 if run_id % 2 else 1 << 30
    mem = KVMemory.open(path, model, tok, store=SqlSpanStore, store_options=store_options, batch_bytes=batch_bytes)
    mem.store = _LoggedStore(mem.store, log)
    step = 0
    while True:
        collection = rng.choice(COLLECTIONS)
        present = [doc_id for _, doc_id in mem.list_documents(collection)]
        if present and rng.random() < 0.15:
            ids = rng.sample(present, rng.randint(1, min(2, len(present))))
            log(ev="begin", op="delete", collection=collection, ids=ids)
            mem.delete(ids, collection=collection)
        else:
            ids = rng.sample(ID_POOL, rng.randint(1, 3))
            docs = [{"id": doc_id, "text": make_text(rng), "meta": {"run": run_id, "step": step, "n": n}}
                    for n, doc_id in enumerate(ids)]
            log(ev="begin", op="add", collection=collection, docs=docs)
            mem.add_documents([d["text"] for d in docs], [d["meta"] for d in docs], ids, collection=collection,
                              progress=False)
        log(ev="done")
        step += 1


def build_model_and_tokenizer() -> tuple[Any, Any]:
    """The tiny llama and the character tokenizer the test builds too (seeded, so the same weights)."""
    import ltri_rag.memory  # noqa: F401  isort: skip  (before transformers: see tests/unit/tiny_tokenizer.py)
    from tests.unit.tiny_models import tiny_model
    from tests.unit.tiny_tokenizer import tiny_tokenizer

    return tiny_model("llama"), tiny_tokenizer()


def zygote() -> None:
    import torch

    torch.set_num_threads(1)  # no intra-op thread pool before fork
    from ltri_rag.storage import SqlSpanStore  # noqa: F401  (warm import: SQLAlchemy, FAISS)

    model, tok = build_model_and_tokenizer()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    gc.freeze()  # the children's garbage collections leave the zygote's objects alone (no copy-on-write of them all)
    print("zygote-ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                writer_loop(model, tok, job["target"], job["data_dir"], Path(job["log"]), job["run"])
            except Exception:
                _Log(Path(job["log"]))(ev="error", traceback=traceback.format_exc())
                raise
            finally:
                os._exit(1)
        print(f"pid {pid}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if sys.argv[1:] == ["zygote"]:
        zygote()
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
