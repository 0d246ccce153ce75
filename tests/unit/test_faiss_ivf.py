"""Per-layer FAISS indexes switch from exact to IVF search past a size: the switch keeps every id, deletes still
work, the index is the same when rebuilt from the same vectors, search stays close to exact on clustered vectors,
and a store that switched still verifies, searches, deletes and reopens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ltri_rag.storage import Fingerprint, SqlSpanStore
from ltri_rag.storage import faiss_index as fi

from tests.unit.store_worker import HEAD_DIM, HEADS, fingerprint_items, make_doc


def _clustered(n: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` vectors around ``clusters`` random centres (what index vectors of real text look like, unlike iid
    noise, which no IVF index searches well), and ``n`` distinct ids that are not ``0..n-1``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32) * 3
    vectors = centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim)).astype(np.float32)
    ids = rng.permutation(10 * n)[:n].astype(np.int64) + 7
    return vectors.astype(np.float32), ids


def _exact_top(vectors, ids, query, k):
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return set(ids[order].tolist())


def test_layer_switches_to_ivf_and_keeps_ids_deletes_and_recall(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fi, "IVF_MIN_VECTORS", 4000)
    dim = 32
    vectors, ids = _clustered(6000, dim, clusters=120, seed=0)
    indexes = fi.LayerIndexes(tmp_path, dim)
    indexes.add(0, ids[:3000], vectors[:3000])
    assert not fi.is_ivf(indexes.get(0))  # below the threshold: exact
    indexes.add(0, ids[3000:5000], vectors[3000:5000])
    assert fi.is_ivf(indexes.get(0))  # the add that reached it rebuilt the layer
    indexes.add(0, ids[5000:], vectors[5000:])  # later adds go to the trained lists
    index = indexes.get(0)
    assert index.ntotal == 6000 and index.nprobe < index.nlist
    assert sorted(indexes.ids(0).tolist()) == sorted(ids.tolist())

    rng = np.random.default_rng(1)
    queries = vectors[rng.integers(0, 6000, 50)] + rng.normal(size=(50, dim)).astype(np.float32) * 0.5
    recall = []
    for q in queries:
        scores, got = indexes.search(0, q, 10)
        assert np.all(np.diff(scores) <= 1e-5)  # best first
        recall.append(len(set(got.tolist()) & _exact_top(vectors, ids, q, 10)) / 10)
    assert np.mean(recall) >= 0.9, np.mean(recall)

    gone = ids[::3]
    indexes.remove(0, gone)
    assert sorted(indexes.ids(0).tolist()) == sorted(set(ids.tolist()) - set(gone.tolist()))
    for q in queries[:10]:
        _, got = indexes.search(0, q, 20)
        assert not set(got.tolist()) & set(gone.tolist())

    indexes.persist([0])
    reread = fi.LayerIndexes(tmp_path, dim)
    for q in queries[:10]:
        a, b = indexes.search(0, q, 10), reread.search(0, q, 10)
        assert np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0])


def test_ivf_build_is_deterministic() -> None:
    vectors, ids = _clustered(2000, 16, clusters=40, seed=2)
    a, b = fi.make_ivf(vectors, ids), fi.make_ivf(vectors, ids)
    q = vectors[:20]
    assert np.array_equal(a.search(q, 5)[1], b.search(q, 5)[1])


def test_store_past_the_threshold_verifies_searches_deletes_and_reopens(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fi, "IVF_MIN_VECTORS", 700)
    fp = Fingerprint(fingerprint_items())
    path = tmp_path / "mem"
    docs = [make_doc(f"d{i}", seed=i, num_tokens=240) for i in range(12)]
    g = torch.Generator().manual_seed(5)
    queries = [torch.randn(HEADS, HEAD_DIM, generator=g) for _ in range(5)]
    with SqlSpanStore.create(path, fp) as store:
        store.add(docs)
        assert fi.is_ivf(store.indexes.get(0)) and fi.is_ivf(store.indexes.get(2))
        assert store.verify().clean
        for q in queries:
            hits = store.search(2, q, 5)
            assert len(hits) == 5 and all(h.text for h in hits)
        store.delete(["d3", "d7"])
        assert store.verify().clean
        before = [[(h.doc_id, h.span_idx) for h in store.search(2, q, 8)] for q in queries]
        assert not {d for hits in before for d, _ in hits} & {"d3", "d7"}
    with SqlSpanStore.open(path, fp, read_only=True) as reader:
        assert reader.verify().clean
        after = [[(h.doc_id, h.span_idx) for h in reader.search(2, q, 8)] for q in queries]
    assert after == before


def test_a_small_collection_in_an_ivf_layer_gets_its_k_hits(tmp_path: Path, monkeypatch) -> None:
    """IVF probes part of its lists: a collection (or filter) whose few vectors sit in unprobed lists came back
    short, often empty. A short probed result now searches every list."""
    monkeypatch.setattr(fi, "IVF_MIN_VECTORS", 700)
    fp = Fingerprint(fingerprint_items())
    small = make_doc("s", collection="small", seed=99, num_tokens=60)
    g = torch.Generator().manual_seed(7)
    with SqlSpanStore.create(tmp_path / "mem", fp) as store:
        store.add([make_doc(f"d{i}", seed=i, num_tokens=240) for i in range(250)] + [small])  # ~20K vectors
        index = store.indexes.get(2)
        assert fi.is_ivf(index) and index.nprobe * 4 <= index.nlist
        spans = len(next(layer for layer in small.layers if layer.layer == 2).token_starts)
        k = min(4, spans)
        for _ in range(10):
            hits = store.search(2, torch.randn(HEADS, HEAD_DIM, generator=g), k, collection="small")
            assert len(hits) == k and all(h.collection == "small" for h in hits)


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_tiny_layers_stay_exact(tmp_path: Path, n: int) -> None:
    indexes = fi.LayerIndexes(tmp_path, 8)
    vectors, ids = _clustered(max(n, 1), 8, clusters=1, seed=3)
    indexes.add(0, ids[:n], vectors[:n])
    assert not fi.is_ivf(indexes.get(0))
    assert len(indexes.search(0, np.ones(8, np.float32), 3)[1]) == n
