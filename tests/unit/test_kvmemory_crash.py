"""``KVMemory`` crash safety: a process ingesting documents through ``add_documents`` is SIGKILLed at random points
(during the model's work, during the store's writes and commit, while it opens and repairs the store), 24 times; after
each kill the memory must reopen clean, hold only whole documents, and keep every document added before.

The writer is a child forked by a warm "zygote" process (``memory_worker.py``), as in ``test_storage.py``'s store-level
crash test, so that each kill costs a fork instead of importing transformers. The child logs each call before and after
it; the test replays the logs to know, after each kill, which documents must be there and which one call may have
stored any of its documents (each whole, old or new) or none. Runs on SQLite, and on PostgreSQL when
``LTRI_TEST_POSTGRES_URL`` names a server (``test_storage.py``'s ``loc`` fixture).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from ltri_rag.storage import SqlSpanStore

from ltri_rag import KVMemory, LtriConfig
from tests.unit import test_storage
from tests.unit.memory_worker import build_model_and_tokenizer, config_items, memory_args

# where the store lives: a folder (SQLite), and a fresh PostgreSQL database when LTRI_TEST_POSTGRES_URL names a server
# (skipped otherwise); the span store tests' fixture
loc = test_storage.loc

WORKER = Path(__file__).with_name("memory_worker.py")
KILLS = 24

Key = tuple[str, str]  # (collection, doc_id)
State = tuple[str, dict] | None  # (text, metadata), or None: absent


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return build_model_and_tokenizer()


class Zygote:
    """The warm process that forks the writers (one for the module: it imports transformers once)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(WORKER), "zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1",
                                          "TOKENIZERS_PARALLELISM": "false"})
        self.ready = False

    def fork(self, **job: Any) -> int:
        """Start a writer child (see ``memory_worker.py`` for ``job``); its pid."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if not self.ready:
            assert self.proc.stdout.readline().strip() == "zygote-ready"
            self.ready = True
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline().split()[1])


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()  # (its imports run while the model is built and the store created)
    try:
        yield z
    finally:
        z.proc.kill()
        z.proc.wait()


def _events(log: Path) -> list[dict]:
    """The run's complete log lines (a kill cannot leave a partial one, but ignore one anyway)."""
    if not log.exists():
        return []
    lines = log.read_text().split("\n")[:-1]  # the text after the last newline is not a whole line
    return [json.loads(line) for line in lines]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_event(pid: int, log: Path, kind: str, count: int) -> dict:
    """Poll the log until it holds ``count`` events of ``kind``; returns the last of them."""
    deadline = time.monotonic() + 60
    while True:
        events = _events(log)
        found = [e for e in events if e["ev"] == kind]
        if len(found) >= count:
            return found[count - 1]
        assert not any(e["ev"] == "error" for e in events), events[-1].get("traceback")
        assert _alive(pid), f"the writer died on its own; its log: {events[-3:]}"
        assert time.monotonic() < deadline, f"no {count} {kind!r} events in 60 s: {events[-3:]}"
        time.sleep(0.001)


def _replay(expected: dict[Key, State], events: list[dict]) -> tuple[dict[Key, State], dict[Key, State]]:
    """Apply the completed calls of a run to ``expected``; returns it and what the unfinished call (if any) would
    change: ``{key: new state}``."""
    expected = dict(expected)
    begun: dict | None = None
    for event in events:
        assert event["ev"] != "error", event["traceback"]
        if event["ev"] == "begin":
            assert begun is None
            begun = event
        elif event["ev"] == "done":
            assert begun is not None
            expected.update(_changes(begun))
            begun = None
    return expected, (_changes(begun) if begun else {})


def _changes(op: dict) -> dict[Key, State]:
    coll = op["collection"]
    if op["op"] == "delete":
        return {(coll, doc_id): None for doc_id in op["ids"]}
    return {(coll, d["id"]): (d["text"], d["meta"]) for d in op["docs"]}


def _phase(events: list[dict]) -> str:
    """Where the kill landed, from the last event before it."""
    if not events:
        return "open"  # opening the memory (repairing what the last kill left)
    last = events[-1]
    if last["ev"] == "store":
        return "store"  # SpanStore.add: K/V file, SQL transaction, index files
    if last["ev"] == "done":
        return "between"
    if last["ev"] == "begin" and last["op"] == "delete":
        return "delete"
    return "model"  # tokenizing, reading the document through the model (begin, or a batch stored, more to read)


def _durations(events: list[dict], start: str, end: tuple[str, ...]) -> list[float]:
    """Seconds from each ``start`` event to the next event of a kind in ``end``."""
    out, since = [], None
    for event in events:
        if event["ev"] in end and since is not None:
            out.append(event["t"] - since)
            since = None
        if event["ev"] == start:
            since = event["t"]
    return out


def _digest(mem: KVMemory, collection: str, doc_id: str, num_tokens: int, text: str) -> str:
    """Load every stored layer of a document (checksum verified), check it is whole; a hash of all of it."""
    h = hashlib.sha256()
    for layer in mem.global_layers:
        spans = mem.store.load_spans(doc_id, layer, collection=collection, verify_checksum=True)
        assert spans.keys.shape == spans.values.shape and spans.keys.shape[0] == num_tokens
        assert spans.spans[0].token_start == 0 and spans.spans[-1].token_end == num_tokens
        for a, b in zip(spans.spans, spans.spans[1:]):
            assert a.token_end == b.token_start and a.vector_end == b.vector_start
        assert spans.spans[-1].vector_end == spans.vectors.shape[0] == spans.owner.numel()
        assert all(0 <= s.char_start <= s.char_end <= len(text) for s in spans.spans)
        for t in (spans.keys, spans.values, spans.vectors, spans.owner):
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        h.update(repr(spans.spans).encode())
    return h.hexdigest()


def _check_memory(mem: KVMemory, tok: Any, expected: dict[Key, State], pending: dict[Key, State],
                  digests: dict[Key, tuple[State, str]]) -> dict[Key, State]:
    """After a kill: every document whole and as expected, or as the unfinished call left it; returns the state."""
    report = mem.verify()
    assert report.clean, report
    listed = set(mem.list_documents())
    assert listed <= set(expected) | set(pending), f"documents nobody added: {listed - set(expected) - set(pending)}"
    actual: dict[Key, State] = {}
    for key in sorted(set(expected) | set(pending)):
        coll, doc_id = key
        state: State = None
        if key in listed:
            info = mem.get([doc_id], collection=coll)[0]
            state = (info.text, dict(info.metadata))
            assert info.layers == tuple(mem.global_layers)
            assert info.num_tokens == len(tok(info.text, add_special_tokens=False)["input_ids"])
            digest = _digest(mem, coll, doc_id, info.num_tokens, info.text)
            if key in digests and digests[key][0] == state:  # the same document as after the last kill
                assert digests[key][1] == digest, f"{key}: its K/V changed while nobody wrote it"
            digests[key] = (state, digest)
            actual[key] = state
        allowed = [expected.get(key)] + ([pending[key]] if key in pending else [])
        assert state in allowed, f"{key}: stored {state}, expected one of {allowed}"
    assert mem.stats().documents == len(listed)
    hits = mem.retrieve("the quiet river near Paris", k=3)  # imports every stored document into a session
    assert bool(hits) == bool(listed)
    for hit in hits:
        assert hit.text == actual[(hit.collection, hit.doc_id)][0][hit.char_start:hit.char_end]
    return actual


def test_sigkill_during_add_documents_leaves_whole_documents(tmp_path: Path, loc: test_storage.Location,
                                                            model_and_tokenizer, zygote: Zygote) -> None:
    model, tok = model_and_tokenizer
    target, data_dir = str(loc.target), str(loc.data_dir) if loc.data_dir else None
    store_options = memory_args(target, data_dir)[1]
    KVMemory.create(target, model, tok, LtriConfig(**config_items()), store=SqlSpanStore,
                    store_options=store_options).close()
    rng = random.Random(20240611)
    expected: dict[Key, State] = {}  # what the store must hold after the calls known to be complete
    digests: dict[Key, tuple[State, str]] = {}  # each document's K/V hash as last seen
    kills, counts, versions = 0, [], set()
    phases: Counter[str] = Counter()
    dirty = 0  # kills after which the store needed repair (a write was cut short)
    model_times: list[float] = []  # seconds from a call's start to its first store write, seen so far
    store_times: list[float] = []  # seconds a SpanStore.add took, seen so far
    pid = None
    try:
        for run in range(KILLS):
            log = tmp_path / f"run{run}.jsonl"
            pid = zygote.fork(run=run, target=target, data_dir=data_dir, log=str(log))
            trigger = ("time", "model", "store")[run % 3]
            if trigger == "time":  # from the fork: opening, the first calls, or well into the loop
                time.sleep(rng.uniform(*rng.choice(((0.0, 0.05), (0.05, 0.2), (0.15, 0.5)))))
            elif trigger == "model":  # after a call begins, within the time the model takes
                _wait_for_event(pid, log, "begin", rng.randint(1, 2))
                time.sleep(rng.uniform(0, sorted(model_times)[len(model_times) // 2] if model_times else 0.03))
            else:  # after a batch goes to the store, within the time the store takes to write it
                _wait_for_event(pid, log, "store", rng.randint(1, 2))
                time.sleep(rng.uniform(0, sorted(store_times)[len(store_times) // 2] if store_times else 0.03))
            assert _alive(pid), f"the writer died on its own; its log: {_events(log)[-3:]}"
            os.kill(pid, signal.SIGKILL)
            kills += 1
            deadline = time.monotonic() + 10
            while _alive(pid):  # wait until the kernel has reaped it (its writer lock is gone then)
                assert time.monotonic() < deadline
                time.sleep(0.005)
            events = _events(log)
            phases[_phase(events)] += 1
            model_times += _durations(events, "begin", ("store",))
            store_times += _durations(events, "store", ("stored",))
            expected, pending = _replay(expected, events)

            # before any repair: a crash may leave orphan files and indexes out of step, never a broken document
            with KVMemory.open(target, model, tok, store=SqlSpanStore,
                               store_options={**store_options, "read_only": True}) as reader:
                before = reader.verify()
            assert not (before.missing_files or before.checksum_failures or before.shape_mismatches), (run, before)
            dirty += not before.clean
            # opening for writing repairs; then verify() is clean and every document whole
            with KVMemory.open(target, model, tok, store=SqlSpanStore, store_options=store_options) as mem:
                try:
                    expected = _check_memory(mem, tok, expected, pending, digests)
                except AssertionError as err:
                    raise AssertionError(f"after kill {kills} (phase {_phase(events)}): {err}") from err
            counts.append(len(expected))
            versions |= {(key, json.dumps(state[1], sort_keys=True)) for key, state in expected.items()}
    finally:
        if pid is not None and _alive(pid):  # a failed check: stop the writer
            os.kill(pid, signal.SIGKILL)
    print(f"kills={kills} documents after each kill={counts} document versions seen={len(versions)} "
          f"kills by phase={dict(phases)} kills that left something to repair={dirty}")
    assert kills >= 20 and counts[-1] > 0 and len(versions) >= 10
    assert phases["store"] >= 2 and phases["model"] >= 2, phases
