"""The store's low-level writes: K/V files streamed in the safetensors format (read back by safetensors itself,
checksummed on the way) and the column-wise bulk insert of rows."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ltri_rag.storage.kvfiles import TMP_SUFFIX, read_layer, safetensors_header, write_kv_file
from ltri_rag.storage.queries import bulk_insert
from safetensors import safe_open
from safetensors.torch import load, save
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, select
from sqlalchemy.orm import Session


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(7, 2, 6, generator=gen).to(torch.bfloat16)
    return {
        "layer0.k": keys,
        "layer0.v": torch.randn(6, 7, 2, generator=gen).to(torch.bfloat16).permute(1, 2, 0),  # not contiguous
        "layer0.vectors": torch.randn(5, 2, 6, generator=gen),
        "layer0.owner": torch.tensor([0, 0, 1, 2, 2]),
        "layer3.k": torch.zeros(0, 2, 6, dtype=torch.bfloat16),  # a layer without tokens
        "flags": torch.tensor([True, False, True]),
        "half": torch.randn(3, generator=gen).half(),
    }


def test_written_file_is_safetensors_with_its_checksum(tmp_path: Path) -> None:
    tensors = _tensors()
    meta = {"doc_id": "d1", "collection": "c"}
    path = tmp_path / "doc.safetensors"
    sha = write_kv_file(path, tensors, meta)
    data = path.read_bytes()
    assert sha == hashlib.sha256(data).hexdigest()
    back = load(data)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta
    assert len(data) == len(save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    assert int.from_bytes(data[:8], "little") % 8 == 0  # the data starts 8-byte aligned
    assert torch.equal(read_layer(path, 0)["k"], tensors["layer0.k"])
    assert list(tmp_path.iterdir()) == [path]


def test_unsupported_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="'z': dtype torch.complex64"):
        safetensors_header({"z": torch.zeros(2, dtype=torch.complex64)}, {})
    with pytest.raises(TypeError, match="metadata values must be strings"):
        safetensors_header({"a": torch.zeros(2)}, {"n": 3})  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    def broken(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        write_kv_file(tmp_path / "doc.safetensors", _tensors(), {"doc_id": "d1"})
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX) or p.suffix == ".safetensors"]


def _table() -> tuple[Table, Session]:
    meta = MetaData()
    table = Table("pairs", meta, Column("id", Integer, primary_key=True), Column("row", Integer),
                  Column("value", Integer))
    engine = create_engine("sqlite://")
    meta.create_all(engine)
    return table, Session(engine)


def test_bulk_insert_writes_every_row_in_column_order() -> None:
    table, s = _table()
    with s, s.begin():
        count = bulk_insert(s, table, {"value": np.array([10, 20, 30]), "id": np.array([1, 2, 3]),
                                       "row": np.arange(3)})
        assert count == 3
        assert bulk_insert(s, table, {"id": np.zeros(0), "row": np.zeros(0), "value": np.zeros(0)}) == 0
        rows = s.execute(select(table.c.id, table.c.row, table.c.value).order_by(table.c.id)).all()
    assert [tuple(r) for r in rows] == [(1, 0, 10), (2, 1, 20), (3, 2, 30)]


def test_bulk_insert_names_bad_columns() -> None:
    table, s = _table()
    with s:
        with pytest.raises(ValueError, match=r"columns \['id', 'row'\] do not match table 'pairs'"):
            bulk_insert(s, table, {"id": np.arange(2), "row": np.arange(2)})
        with pytest.raises(ValueError, match=r"differ in length: \[2, 3\]"):
            bulk_insert(s, table, {"id": np.arange(2), "row": np.arange(3), "value": np.arange(2)})
