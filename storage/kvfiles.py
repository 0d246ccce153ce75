"""K/V + index-vector files: one safetensors file per document, written atomically, checksummed, read lazily.

A file holds, per stored layer ``L``: ``layer{L}.k`` / ``layer{L}.v`` ``[num_tokens, num_kv_heads, head_dim]`` (store
dtype), ``layer{L}.vectors`` ``[num_vectors, num_kv_heads, head_dim]`` float32 grouped by span, and ``layer{L}.owner``
``[num_vectors]`` int64. Never pickle: safetensors holds raw tensors and a JSON header only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open

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


# safetensors' names of the dtypes a store file holds
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors prefix of a file holding ``tensors`` in the dict's order: the header's length (8 bytes,
    little-endian) and its JSON, padded with spaces so that the data starts 8-byte aligned.

    Raises:
        TypeError: a tensor's dtype has no safetensors name here, or a metadata value is not a string.
    """
    entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    if any(not isinstance(v, str) for v in metadata.values()):
        raise TypeError(f"safetensors metadata values must be strings, got {metadata!r}")
    offset = 0
    for name, t in tensors.items():
        dtype = _SAFETENSORS_DTYPES.get(t.dtype)
        if dtype is None:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be written to a store file")
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def write_kv_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write ``tensors`` (CPU) to ``path`` as a safetensors file, atomically, and return the file's sha256 (hex).

    The tensors' bytes go from their own memory to the file (no serialised copy of the whole file in between) and
    are hashed on the way: temp file, write, fsync, rename, fsync the folder, as :func:`write_atomic`.
    """
    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {t.device}; store files are written from host tensors")
    prefix = safetensors_header(tensors, metadata)
    digest = hashlib.sha256(prefix)
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(prefix)
            for t in tensors.values():
                if t.numel() == 0:
                    continue
                raw = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's bytes, not a copy
                digest.update(raw)
                f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return digest.hexdigest()


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
