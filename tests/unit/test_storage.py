"""The persistent span store (SQLite + FAISS + safetensors) on synthetic tensors: round trip, replace, delete,
collections, filters, fingerprints, verify / repair, bad input, SIGKILL crash safety, readers beside a writer.

Each test that opens a store runs twice: on SQLite (a store folder) and on PostgreSQL (a fresh database per test on
the server named by ``LTRI_TEST_POSTGRES_URL``, an admin URL such as
``postgresql+psycopg://postgres@127.0.0.1:55432/postgres``; ``.ci/run`` starts one from Debian's packages). Without
that variable the PostgreSQL runs are skipped, saying so."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from ltri_rag.storage import (
    DocumentNotFound,
    DocumentRecord,
    Fingerprint,
    FingerprintMismatch,
    SqlSpanStore,
    StoreError,
)
from sqlalchemy import create_engine, text

from ltri_rag.store import LayerRecord, SpanStore
from tests.unit import store_locations
from tests.unit.store_locations import FP, Location
from tests.unit.store_worker import HEAD_DIM, HEADS, STORED_LAYERS, fingerprint_items, make_doc

WORKER = Path(__file__).with_name("store_worker.py")
loc = store_locations.loc  # the store-location fixture (SQLite and PostgreSQL)


@pytest.fixture
def store(loc: Location):
    with loc.create() as s:
        yield s


def _queries(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(HEADS, HEAD_DIM, generator=g) for _ in range(n)]


def _snapshot(s: SqlSpanStore) -> dict:
    """Everything observable: documents, search results, loaded spans, stats."""
    out: dict = {"docs": s.list_documents(), "stats": s.stats().documents, "search": [], "spans": []}
    for layer in STORED_LAYERS:
        for q in _queries():
            out["search"].append(s.search(layer, q, 7))
            out["search"].append(s.search(layer, q.reshape(-1), 3, collection="b"))
    for coll, doc_id in out["docs"]:
        info = s.get([doc_id], collection=coll)[0]
        out["spans"].append((info.doc_id, info.text, dict(info.metadata), info.num_tokens, info.layers))
        for layer in STORED_LAYERS:
            ls = s.load_spans(doc_id, layer, collection=coll)
            out["spans"].append((ls.spans, ls.keys.tolist(), ls.values.tolist(), ls.vectors.tolist(), ls.owner.tolist()))
    return out


def _db_counts(loc: Location) -> dict[str, int]:
    engine = create_engine(loc.db_url)
    with engine.connect() as c:
        out = {t: c.execute(text(f"select count(*) from {t}")).scalar_one() for t in ("documents", "spans")}
        out["vectors"] = c.execute(text("select coalesce(sum(vector_end - vector_start), 0) from spans")).scalar_one()
    engine.dispose()
    return out


def _index_ids(path: Path) -> set[int]:
    ids: set[int] = set()
    for f in (path / "faiss").glob("layer*.index"):
        index = faiss.read_index(str(f))  # kept alive while its id map is read (the map is the index's memory)
        ids |= set(faiss.vector_to_array(index.id_map).tolist())
    return ids


# ---------------------------------------------------------------------------------------------- round trip
def test_protocol_and_round_trip(loc: Location) -> None:
    with loc.create() as s:
        assert isinstance(s, SpanStore)
        s.add([make_doc(f"d{i}", collection="a" if i % 2 else "b", seed=i) for i in range(10)])
        s.add(make_doc("solo", seed=50))
        before = _snapshot(s)
        stats = s.stats()
    assert stats.documents == 11 and stats.spans > 0 and stats.vectors > stats.spans and stats.bytes_per_token > 0
    with loc.open() as s:
        assert _snapshot(s) == before
        assert s.verify().clean
    with loc.open(None, read_only=True) as s:
        assert _snapshot(s) == before
        with pytest.raises(StoreError, match="read-only"):
            s.add(make_doc("x"))


def test_search_scores_and_hits(store: SqlSpanStore) -> None:
    docs = [make_doc(f"d{i}", seed=i) for i in range(6)]
    store.add(docs)
    q = _queries(1)[0]
    hits = store.search(2, q, 10)
    # brute force: per span, max over its vectors of the inner product summed over heads
    best = []
    for d in docs:
        rec = next(r for r in d.layers if r.layer == 2)
        scores = (rec.vectors * q).sum(dim=(1, 2))
        for span in range(rec.num_spans):
            best.append((float(scores[rec.owner == span].max()), d.doc_id, span))
    best.sort(reverse=True)
    assert [(h.doc_id, h.span_idx) for h in hits] == [(d, sp) for _, d, sp in best[:10]]
    assert np.allclose([h.score for h in hits], [b for b, _, _ in best[:10]], atol=1e-5)
    doc = {d.doc_id: d for d in docs}[hits[0].doc_id]
    assert hits[0].text == doc.text[hits[0].char_start:hits[0].char_end]


def test_replace_by_id(store: SqlSpanStore) -> None:
    store.add([make_doc("x", seed=1), make_doc("y", seed=2)])
    old_files = set(os.listdir(store.kv_dir))
    store.add(make_doc("x", seed=3, num_tokens=30, metadata={"v": 2}))
    info = store.get(["x"])[0]
    assert info.metadata == {"v": 2} and info.num_tokens == 30
    assert len(os.listdir(store.kv_dir)) == 2 and len(set(os.listdir(store.kv_dir)) & old_files) == 1
    assert store.load_spans("x", 0).keys.shape[0] == 30
    assert {h.doc_id for h in store.search(0, _queries(1)[0], 100)} == {"x", "y"}
    assert store.verify().clean and store.stats().documents == 2


def test_delete_leaves_nothing(loc: Location) -> None:
    path = loc.files
    with loc.create() as s:
        s.add([make_doc(f"d{i}", seed=i) for i in range(4)])
        ids_before = _index_ids(path)
        with pytest.raises(DocumentNotFound, match="nope"):
            s.delete(["d1", "nope"])
        assert s.stats().documents == 4 and _index_ids(path) == ids_before
        s.delete(["d0", "d1", "d2", "d3"])
        assert s.verify().clean and s.search(0, _queries(1)[0], 5) == [] and s.list_documents() == []
        with pytest.raises(DocumentNotFound):
            s.get(["d0"])
    assert _db_counts(loc) == {"documents": 0, "spans": 0, "vectors": 0}
    assert _index_ids(path) == set() and len(ids_before) > 0
    assert os.listdir(path / "kv") == []


def test_collections_isolated(store: SqlSpanStore) -> None:
    store.add([make_doc("same", collection="a", seed=1), make_doc("same", collection="b", seed=2)])
    assert store.collections() == ["a", "b"]
    assert store.get(["same"], collection="a")[0].text != store.get(["same"], collection="b")[0].text
    q = _queries(1)[0]
    assert {h.collection for h in store.search(0, q, 50, collection="a")} == {"a"}
    assert {h.collection for h in store.search(0, q, 50)} == {"a", "b"}
    assert store.search(0, q, 5, collection="zzz") == []
    store.delete(["same"], collection="a")
    assert store.list_documents() == [("b", "same")] and store.collections() == ["b"]
    with pytest.raises(DocumentNotFound):
        store.delete(["same"], collection="a")


def test_metadata_filter_returns_k(store: SqlSpanStore) -> None:
    store.add([make_doc(f"d{i}", seed=i, metadata={"group": i % 5, "lang": "en"}) for i in range(30)])
    for q in _queries():
        hits = store.search(0, q, 6, filter={"group": 3, "lang": "en"})
        assert len(hits) == 6 and {store.get([h.doc_id])[0].metadata["group"] for h in hits} == {3}
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert len({(h.doc_id, h.span_idx) for h in hits}) == 6
    assert store.search(0, _queries(1)[0], 6, filter={"group": 99}) == []


# --------------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_mismatch_names_every_key(loc: Location) -> None:
    loc.create().close()
    other = Fingerprint(fingerprint_items(model="other", head_dim=8, tokenizer_sha256="ee", new_key=1))
    with pytest.raises(FingerprintMismatch) as err:
        loc.open(other)
    assert set(err.value.differences) == {"model", "head_dim", "tokenizer_sha256", "new_key"}
    for key, (old, new) in err.value.differences.items():
        assert key in str(err.value) and repr(old) in str(err.value) and repr(new) in str(err.value)
    assert FP.diff(FP) == {} and Fingerprint.from_json(FP.to_json()) == FP
    with pytest.raises(ValueError, match="num_kv_heads"):
        Fingerprint(num_layers=1, head_dim=4, dtype="float16")


def test_missing_existing_and_locked_stores(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store"):
        SqlSpanStore.open(tmp_path / "none", FP)
    with pytest.raises(ValueError, match="data_dir"):
        SqlSpanStore.create(f"sqlite:///{tmp_path / 'm.sqlite'}", FP)
    with SqlSpanStore.create(f"sqlite:///{tmp_path / 'm.sqlite'}", FP, data_dir=tmp_path / "files") as s:
        s.add(make_doc("u", seed=1))
        with pytest.raises(StoreError, match="open for writing"):
            SqlSpanStore.open(f"sqlite:///{tmp_path / 'm.sqlite'}", FP, data_dir=tmp_path / "files")
    with SqlSpanStore.open(f"sqlite:///{tmp_path / 'm.sqlite'}", FP, data_dir=tmp_path / "files") as s:
        assert s.get(["u"])[0].num_tokens > 0 and s.verify().clean
    with pytest.raises(StoreError, match="already exists"):
        SqlSpanStore.create(f"sqlite:///{tmp_path / 'm.sqlite'}", FP, data_dir=tmp_path / "files")


# ------------------------------------------------------------------------------------------ index writes
def test_index_files_are_written_a_bounded_number_of_times(loc: Location, monkeypatch) -> None:
    """Documents added one at a time: each index vector reaches the FAISS files a bounded number of times. (Every
    layer's whole index was rewritten after every add, which made a large ingest quadratic: ~30x the vectors
    here.)"""
    from ltri_rag.storage.faiss_index import LayerIndexes
    from ltri_rag.storage.span_store import INDEX_WRITE_GROWTH

    written: list[int] = []
    persist = LayerIndexes.persist

    def counting(self, layers):
        written.append(sum(self.get(layer).ntotal for layer in set(layers)))
        persist(self, layers)

    monkeypatch.setattr(LayerIndexes, "persist", counting)
    with loc.create() as s:
        for i in range(60):
            s.add(make_doc(f"d{i}", seed=i))
        peak = s.stats().vectors
        s.delete([f"d{i}" for i in range(0, 60, 3)])
        assert s.verify().clean  # (a writer's verify writes what is pending first)
    assert 0 < sum(written) <= (2 + 1 / INDEX_WRITE_GROWTH) * peak, (sum(written), peak)


def test_index_changes_not_yet_written_are_searched_and_survive_a_crash(loc: Location) -> None:
    s = loc.create()
    i = 0
    while not s._dirty_layers:  # add until the store defers an index write
        s.add(make_doc(f"d{i}", seed=i))
        i += 1
        assert i < 100, "the store never deferred an index write"
    queries = _queries()
    expected = [[(h.doc_id, h.span_idx) for h in s.search(layer, q, 200)] for layer in STORED_LAYERS for q in queries]
    newest = f"d{i - 1}"
    assert any(newest in {d for d, _ in hits} for hits in expected)  # this process searches the pending vectors
    with loc.open(read_only=True) as reader:  # another process's view: committed rows, the files as written
        assert reader.verify().stale_layers and reader.list_documents() == s.list_documents()
        for layer in STORED_LAYERS:
            assert all(h.doc_id != newest for h in reader.search(layer, queries[0], 200))
    os.close(s._lock_fd)  # the writer dies: nothing more is written
    s._lock_fd = None
    s.engine.dispose()
    with loc.open() as again:  # open repairs: the missing vectors come back from the K/V files
        assert again.verify().clean
        got = [[(h.doc_id, h.span_idx) for h in again.search(layer, q, 200)] for layer in STORED_LAYERS
               for q in queries]
    assert got == expected


# ------------------------------------------------------------------------------------------ verify / repair
def test_a_writer_opening_a_cleanly_closed_store_skips_the_id_comparison(loc: Location, monkeypatch) -> None:
    """After a clean close a writer's open runs only the cheap checks (no listing of every vector id); a store left
    with an index that lost vectors, or an orphan K/V file, still gets the full repair at open."""
    from ltri_rag.storage import integrity

    repairs: list[int] = []
    real = integrity.repair

    def spy(*args, **kwargs):
        repairs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(integrity, "repair", spy)
    with loc.create() as s:
        s.add([make_doc(f"d{i}", seed=i) for i in range(4)])
        expected = [s.search(layer, q, 50) for layer in STORED_LAYERS for q in _queries(2)]
    with loc.open() as s:
        assert not repairs and s.verify().clean
        assert [s.search(layer, q, 50) for layer in STORED_LAYERS for q in _queries(2)] == expected
    index_file = loc.files / "faiss" / "layer0.index"
    index = faiss.read_index(str(index_file))
    index.remove_ids(faiss.vector_to_array(index.id_map)[:3].astype(np.int64))  # vectors lost, same generation
    faiss.write_index(index, str(index_file))
    with loc.open() as s:
        assert repairs == [1] and s.verify().clean
        assert [s.search(layer, q, 50) for layer in STORED_LAYERS for q in _queries(2)] == expected
    (loc.files / "kv" / "stray.safetensors").write_bytes(b"x")  # a K/V file no document row names
    with loc.open() as s:
        assert repairs == [1, 1] and s.verify().clean and not (loc.files / "kv" / "stray.safetensors").exists()


def test_verify_and_repair(loc: Location) -> None:
    path = loc.files
    with loc.create() as s:
        s.add([make_doc(f"d{i}", seed=i) for i in range(3)])
        assert s.verify().clean
        old_index = (path / "faiss" / "layer0.index").read_bytes()
        s.add([make_doc(f"e{i}", seed=10 + i) for i in range(3)])
        names = sorted(os.listdir(path / "kv"))
        # stale index: an older copy of layer 0's file
        (path / "faiss" / "layer0.index").write_bytes(old_index)
        report = s.verify()
        assert report.index_missing.get(0, 0) > 0 and report.stale_layers == (0,) and not report.index_extra
        assert s.repair().stale_layers == (0,)
        assert s.verify().clean and len(s.search(0, _queries(1)[0], 100)) > 0
        # a corrupted file, a deleted file, an orphan file
        corrupt = bytearray((path / "kv" / names[0]).read_bytes())
        corrupt[-1] ^= 0xFF
        (path / "kv" / names[0]).write_bytes(bytes(corrupt))
        (path / "kv" / names[1]).unlink()
        (path / "kv" / "stray.safetensors.1234.tmp").write_bytes(b"x")
        report = s.verify()
        assert report.checksum_failures == (names[0],) and report.missing_files == (names[1],)
        assert report.orphan_files == ("stray.safetensors.1234.tmp",) and not report.clean
        problems = []
        for _, d in s.list_documents():
            try:
                s.load_spans(d, 0, verify_checksum=True)
            except StoreError as err:
                problems.append(str(err).split()[0:2])
        assert sorted(problems) == [["K/V", "file"], ["checksum", "mismatch"]]
        s.repair(drop_broken=True)
        assert s.verify().clean and s.stats().documents == 4


# ------------------------------------------------------------------------------------------------ bad input
def _doc_with(**changes):
    base = make_doc("ok", seed=7)
    fields = {"doc_id": base.doc_id, "collection": base.collection, "text": base.text, "num_tokens": base.num_tokens,
              "layers": base.layers, "metadata": base.metadata}
    layer_changes = changes.pop("layer0", None)
    fields.update(changes)
    if layer_changes:
        rec = base.layers[0]
        parts = {k: getattr(rec, k) for k in ("layer", "keys", "values", "token_starts", "token_ends", "char_starts",
                                              "char_ends", "vectors", "owner")}
        parts.update(layer_changes(parts))
        fields["layers"] = (LayerRecord(**parts), *base.layers[1:])
    return DocumentRecord(**fields)


def _nan_vectors(p):
    v = p["vectors"].clone()
    v[0, 0, 0] = float("nan")
    return {"vectors": v}


BAD_INPUT = [
    ("empty text", lambda s: s.add(_doc_with(text="")), ValueError, "text"),
    ("bytes text", lambda s: s.add(_doc_with(text=b"abc")), ValueError, "text"),
    ("invalid unicode text", lambda s: s.add(_doc_with(text="x\udc80" + make_doc("ok", seed=7).text[2:])), ValueError,
     "not valid Unicode"),
    ("empty id", lambda s: s.add(_doc_with(doc_id="")), ValueError, "doc_id"),
    ("int id", lambda s: s.add(_doc_with(doc_id=5)), ValueError, "doc_id"),
    ("dup ids in add", lambda s: s.add([make_doc("a", seed=1), make_doc("a", seed=2)]), ValueError, "repeat"),
    ("dup ids in delete", lambda s: s.delete(["keep", "keep"]), ValueError, "repeat"),
    ("bare string ids", lambda s: s.delete("keep"), TypeError, "keep"),
    ("wrong dtype", lambda s: s.add(_doc_with(layer0=lambda p: {"keys": p["keys"].float(),
                                                                "values": p["values"].float()})), TypeError, "float32"),
    ("wrong heads", lambda s: s.add(_doc_with(layer0=lambda p: {k: p[k][:, :1] for k in ("keys", "values", "vectors")})),
     ValueError, "num_kv_heads"),
    ("keys/values differ", lambda s: s.add(_doc_with(layer0=lambda p: {"values": p["values"][:-1]})), ValueError,
     "values"),
    ("tokens vs keys", lambda s: s.add(_doc_with(num_tokens=999)), ValueError, "999"),
    ("span past end", lambda s: s.add(_doc_with(layer0=lambda p: {"token_ends": p["token_ends"] + 100})), ValueError,
     "span"),
    ("chars past text", lambda s: s.add(_doc_with(layer0=lambda p: {"char_ends": p["char_ends"] + 1000})), ValueError,
     "chars"),
    ("NaN vector", lambda s: s.add(_doc_with(layer0=_nan_vectors)), ValueError, "NaN"),
    ("bad owner", lambda s: s.add(_doc_with(layer0=lambda p: {"owner": p["owner"] + 100})), ValueError, "owner"),
    ("layer out of range", lambda s: s.add(_doc_with(layer0=lambda p: {"layer": 7})), ValueError, "layer"),
    ("metadata not JSON", lambda s: s.add(_doc_with(metadata={"f": object()})), ValueError, "JSON"),
    ("metadata NaN", lambda s: s.add(_doc_with(metadata={"f": float("nan")})), ValueError, "JSON"),
    ("query size", lambda s: s.search(0, torch.randn(3), 5), ValueError, "num_kv_heads"),
    ("k zero", lambda s: s.search(0, torch.randn(HEADS, HEAD_DIM), 0), ValueError, "k must"),
]


@pytest.mark.parametrize("name,call,error,match", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_leaves_store_untouched(store: SqlSpanStore, name, call, error, match) -> None:
    store.add(make_doc("keep", seed=3))
    before = (_snapshot(store), sorted(os.listdir(store.kv_dir)), store.stats())
    with pytest.raises(error, match=match):
        call(store)
    assert (_snapshot(store), sorted(os.listdir(store.kv_dir)), store.stats()) == before
    assert store.verify().clean


# ----------------------------------------------------------------------------------------------- processes
def _check_all_complete(s: SqlSpanStore) -> int:
    """Every listed document loads completely, with its checksum; returns the count."""
    docs = s.list_documents()
    for coll, doc_id in docs:
        info = s.get([doc_id], collection=coll)[0]
        assert info.layers == STORED_LAYERS
        for layer in STORED_LAYERS:
            ls = s.load_spans(doc_id, layer, collection=coll, verify_checksum=True)
            assert ls.keys.shape[0] == info.num_tokens and ls.spans and ls.spans[-1].token_end == info.num_tokens
            assert ls.spans[-1].vector_end == ls.vectors.shape[0] == ls.owner.numel()
    return len(docs)


def _worker_line(zygote: subprocess.Popen, kind: str, writing: set[int]) -> int:
    """Read the zygote's output up to the next ``kind`` line (``pid`` / ``writing``); returns its pid. ``writing``
    lines met on the way (children print them, in any order with the zygote's ``pid`` lines) are noted."""
    while True:
        parts = zygote.stdout.readline().split()
        assert parts and parts[0] != "failed", f"store worker: {' '.join(parts) or 'ended'}"
        if parts[0] == "writing":
            writing.add(int(parts[1]))
        if parts[0] == kind:
            return int(parts[1])


def _committed(log: Path, expected: dict[str, int | None]) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """Replay a writer's log (``store_worker.writer_loop``) onto ``expected`` (document id -> seed, None: deleted);
    returns it and the call the kill cut short, if any (``{id: seed}``)."""
    expected, pending = dict(expected), {}
    lines = log.read_text().split("\n")[:-1] if log.exists() else []  # after the last newline: not a whole line
    for event in map(json.loads, lines):
        if event["ev"] == "begin":
            assert not pending
            pending = {event["id"]: event["seed"]}
        else:
            assert pending == {event["id"]: event["seed"]}
            expected.update(pending)
            pending = {}
    return expected, pending


def test_sigkill_during_writes_leaves_whole_documents(loc: Location, tmp_path: Path) -> None:
    """24 SIGKILLs of a writer at random points (opening and repairing the store too): after each, the store
    reopens clean, every document loads whole, every call that returned before the kill is there (each committed
    add with its own seed, each committed delete gone), and the one call cut short left its document old or new."""
    loc.create().close()
    zygote = subprocess.Popen([sys.executable, str(WORKER), "zygote", *loc.worker_args()], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ""})
    rng = random.Random(1234)
    kills, counts, cut_short = 0, [], 0
    writing: set[int] = set()  # children that have opened the store
    expected: dict[str, int | None] = {}  # every document id ever written -> its committed seed (None: deleted)
    try:
        assert zygote.stdout.readline().strip() == "zygote-ready"
        for run in range(24):
            log = tmp_path / f"writer{run}.jsonl"
            zygote.stdin.write(f"{run} {run * 1000} {log}\n")
            zygote.stdin.flush()
            pid = _worker_line(zygote, "pid", writing)
            if run % 2 == 0:
                # every other kill lands among the writes whatever the machine's load: wait until the child has
                # opened (and repaired) the store; the odd ones may also land in the open / repair itself
                while pid not in writing:
                    _worker_line(zygote, "writing", writing)
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(pid, signal.SIGKILL)
            kills += 1
            deadline = time.monotonic() + 10
            while True:  # wait until the kernel has reaped it (its writer lock is gone then)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.005)
            expected, pending = _committed(log, expected)
            with loc.open() as s:  # repairs
                assert s.verify().clean, s.verify()
                counts.append(_check_all_complete(s))
                stored = {doc_id: s.get([doc_id], collection=coll)[0].metadata["seed"]
                          for coll, doc_id in s.list_documents()}
            for doc_id in set(expected) | set(pending) | set(stored):
                allowed = [expected.get(doc_id)] + ([pending[doc_id]] if doc_id in pending else [])
                assert stored.get(doc_id) in allowed, f"after kill {kills}: {doc_id} holds seed " \
                                                      f"{stored.get(doc_id)}, expected one of {allowed}"
            for doc_id in pending:  # what the kill left is what later kills must find
                expected[doc_id] = stored.get(doc_id)
            cut_short += bool(pending)
    finally:
        zygote.kill()
        zygote.wait()
    print(f"kills={kills} documents after each kill={counts} calls cut short={cut_short}")
    assert kills >= 20 and counts[-1] > 0 and sum(v is not None for v in expected.values()) == counts[-1]
    assert cut_short >= 8  # most kills landed inside a call (12 of them wait for the writes to start)


def test_readers_while_a_writer_adds(loc: Location) -> None:
    with loc.create() as s:
        s.add([make_doc(f"seed{i}", seed=i) for i in range(5)])
        readers = [subprocess.Popen([sys.executable, str(WORKER), "reader", "4", *loc.worker_args()],
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ""})
                   for _ in range(2)]
        i, deadline = 0, time.monotonic() + 5
        while time.monotonic() < deadline and any(r.poll() is None for r in readers):
            s.add(make_doc(f"w{i}", seed=100 + i, collection="b" if i % 2 else "default"))
            i += 1
        outs = [r.communicate(timeout=60) for r in readers]
        for r, (out, err) in zip(readers, outs):
            assert r.returncode == 0, err[-3000:]
            result = json.loads(out.strip().splitlines()[-1])
            assert result["searches"] > 0 and result["hits"] > 0
        assert i > 5 and s.verify().clean

