"""FAISS indexes, one per layer, over the stored index vectors.

Each index is ``IndexIDMap2(IndexFlatIP(num_kv_heads * head_dim))``: a vector ``[num_kv_heads, head_dim]`` is flattened
to one row, so the inner product is summed over the KV heads: one score per (span vector, query) over the shared
retrieval scope of all heads, matching the core's span scoring. The ids are the ``vectors`` table's ids, so deletes are
``remove_ids`` and a hit maps straight to its span.

Exact search while a layer holds fewer than :data:`IVF_MIN_VECTORS` vectors; once an add takes it past that, the
layer is rebuilt as an ``IndexIVFFlat`` (inner product, the stored ids kept, k-means seeded so that the same vectors
give the same index): ``nlist`` about ``4 * sqrt(n)`` lists (at least 39 training points each, FAISS's own
minimum) and ``nprobe`` an eighth of them (at least 16) searched per query. Later adds go to the trained lists; a
layer that shrinks stays IVF until it is rebuilt (``repair``). Exact search costs O(n) per query and layer (about
40 ms for 1M vectors of 128 floats on one core); IVF reads about ``nprobe / nlist`` of them.

Files: ``faiss/layer{L}.index``, replaced atomically (temp + fsync + rename). A reader reloads a layer whenever the
file's identity (inode, mtime, size) changes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import faiss
import numpy as np

from .kvfiles import write_atomic

# a layer switches from exact to IVF search when an add takes it to this many vectors
IVF_MIN_VECTORS = 200_000


def make_index(dim: int) -> faiss.Index:
    """An empty exact inner-product index with external ids (what every layer starts as)."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def is_ivf(index: faiss.Index) -> bool:
    return isinstance(index, faiss.IndexIVF)


def make_ivf(vectors: np.ndarray, ids: np.ndarray, *, seed: int = 1234) -> faiss.IndexIVFFlat:
    """An inner-product IVF index trained on and holding ``vectors [n, dim]`` float32 under ``ids [n]`` int64
    (``n >= 39 * 16``)."""
    n, dim = vectors.shape
    nlist = max(16, min(int(4 * math.sqrt(n)), n // 39))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index.train(vectors)
    index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    index.nprobe = max(16, nlist // 8)
    return index


def _ivf_ids(index: faiss.IndexIVF) -> np.ndarray:
    lists = index.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
             for i in range(index.nlist) if lists.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


class LayerIndexes:
    """The per-layer indexes of one store, loaded lazily from ``folder``.

    Args:
        folder: The ``faiss`` folder.
        dim: ``num_kv_heads * head_dim``.
    """

    def __init__(self, folder: Path, dim: int) -> None:
        self.folder = folder
        self.dim = dim
        self._indexes: dict[int, faiss.Index] = {}
        self._stamps: dict[int, tuple[int, int, int] | None] = {}

    def path(self, layer: int) -> Path:
        return self.folder / f"layer{layer}.index"

    def layers_loaded(self) -> list[int]:
        """Layers whose index is in memory."""
        return sorted(self._indexes)

    def layers_on_disk(self) -> list[int]:
        out = []
        for p in self.folder.glob("layer*.index"):
            stem = p.name[len("layer"):-len(".index")]
            if stem.isdigit():
                out.append(int(stem))
        return sorted(out)

    def _stamp(self, layer: int) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path(layer))
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def get(self, layer: int, *, refresh: bool = False) -> faiss.Index:
        """The layer's index (empty if it has no file). With ``refresh``, reload if the file changed on disk.

        Raises:
            RuntimeError: the file exists but FAISS cannot read it.
        """
        if layer in self._indexes and not (refresh and self._stamp(layer) != self._stamps[layer]):
            return self._indexes[layer]
        stamp = self._stamp(layer)
        index = make_index(self.dim) if stamp is None else faiss.read_index(str(self.path(layer)))
        if index.d != self.dim:
            raise RuntimeError(f"{self.path(layer)}: index dimension {index.d}, store needs {self.dim}")
        self._indexes[layer], self._stamps[layer] = index, stamp
        return index

    def forget(self, layer: int) -> None:
        """Drop the in-memory copy of a layer's index (the next use reads the file)."""
        self._indexes.pop(layer, None)
        self._stamps.pop(layer, None)

    def reset(self, layer: int) -> faiss.Index:
        """Replace the layer's in-memory index by an empty one (to rebuild it)."""
        self._indexes[layer] = make_index(self.dim)
        self._stamps[layer] = self._stamp(layer)
        return self._indexes[layer]

    def ids(self, layer: int) -> np.ndarray:
        """``[ntotal]`` int64 ids held by the layer's index (in no particular order for an IVF layer)."""
        index = self.get(layer)
        if is_ivf(index):
            return _ivf_ids(index)
        return faiss.vector_to_array(index.id_map).astype(np.int64)

    def add(self, layer: int, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` ``[n, dim]`` float32 under ``ids`` ``[n]`` int64; an exact layer that reaches
        :data:`IVF_MIN_VECTORS` is rebuilt as IVF (module docstring)."""
        if not len(ids):
            return
        index = self.get(layer)
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
        if not is_ivf(index) and index.ntotal >= max(IVF_MIN_VECTORS, 39 * 16):
            flat = faiss.downcast_index(index.index)
            self._indexes[layer] = make_ivf(flat.reconstruct_n(0, flat.ntotal),
                                            faiss.vector_to_array(index.id_map))

    def remove(self, layer: int, ids: np.ndarray) -> None:
        if len(ids):
            self.get(layer).remove_ids(np.ascontiguousarray(ids, dtype=np.int64))

    def search(self, layer: int, query: np.ndarray, k: int, *,
               exhaustive: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of ``query`` ``[dim]``: ``(scores [<=k], ids [<=k])``, best first (reloads a changed file).

        An IVF index probes ``nprobe`` of its lists, so fewer than ``k`` ids (with ``k`` below the vector count) do
        not mean the index was scanned whole; ``exhaustive`` probes every list (exact, slower)."""
        index = self.get(layer, refresh=True)
        k = min(k, index.ntotal)
        if k <= 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        probes = index.nprobe if exhaustive and is_ivf(index) else None
        if probes is not None:
            index.nprobe = index.nlist
        try:
            scores, ids = index.search(query.reshape(1, -1).astype(np.float32), k)
        finally:
            if probes is not None:
                index.nprobe = probes
        keep = ids[0] >= 0
        return scores[0][keep], ids[0][keep]

    def probes_part(self, layer: int) -> bool:
        """Whether a search of ``layer`` probes part of its index only (IVF)."""
        return is_ivf(self.get(layer))

    def persist(self, layers: list[int]) -> None:
        """Write the given layers' in-memory indexes to their files atomically."""
        for layer in sorted(set(layers)):
            data = faiss.serialize_index(self.get(layer)).tobytes()
            write_atomic(self.path(layer), data)
            self._stamps[layer] = self._stamp(layer)
