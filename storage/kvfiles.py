"""K/V + index-vector files: one safetensors file per document, written atomically, checksummed, read lazily.

A file holds, per stored layer ``L``: ``layer{L}.k`` / ``layer{L}.v`` ``[num_tokens, num_kv_heads, head_dim]`` (store
dtype), ``layer{L}.vectors`` ``[num_vectors, num_kv_heads, head_dim]`` float32 grouped by span, and ``layer{L}.owner``
``[num_vectors]`` int64. Never pickle: safetensors holds raw tensors and a JSON header only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

TMP_SUFFIX = ".tmp"
FILE_SUFFIX = ".safetensors"


def new_file_name(collection: str, doc_id: str) -> str:
    """A fresh file name for a document: a hash of (collection, id) plus a random part.

    The random part makes a replacement write a new file, so the old one stays valid until the metadata commit.
    """
    key = hashlib.sha256(f"{collection}\x00{doc_id}".encode()).hexdigest()[:32]
    return f"{key}-{uuid.uuid4().hex[:12]}{FILE_SUFFIX}"


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename in it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # filesystems that cannot fsync a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file: write, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_kv_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Serialise ``tensors`` to ``path`` atomically and return the file's sha256 (hex)."""
    data = save({name: t.contiguous() for name, t in tensors.items()}, metadata=metadata)
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_layer(path: Path, layer: int) -> dict[str, torch.Tensor]:
    """Read one layer's tensors (``k``, ``v``, ``vectors``, ``owner``) from a memory-mapped file; others stay unread.

    Raises:
        KeyError: the file has no such layer.
    """
    with safe_open(str(path), framework="pt") as f:
        names = [f"layer{layer}.{part}" for part in ("k", "v", "vectors", "owner")]
        present = set(f.keys())
        absent = [n for n in names if n not in present]
        if absent:
            raise KeyError(f"{path.name} lacks {absent}")
        return {n.rpartition(".")[2]: f.get_tensor(n) for n in names}


def layer_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a file, from its header only."""
    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118


def is_temp(name: str) -> bool:
    return name.endswith(TMP_SUFFIX)
