"""Where the storage tests' stores live: a folder (SQLite) or a fresh PostgreSQL database per test.

The ``loc`` fixture runs each test twice: on SQLite, and on PostgreSQL in a fresh database on the server named by
``LTRI_TEST_POSTGRES_URL`` (an admin URL such as ``postgresql+psycopg://postgres@127.0.0.1:55432/postgres``;
``.ci/run`` starts one from Debian's packages). Without that variable the PostgreSQL runs are skipped, saying so.
Test modules take the fixture with ``loc = store_locations.loc``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from ltri_rag.storage import Fingerprint, SqlSpanStore
from sqlalchemy import create_engine, text

from tests.unit.store_worker import fingerprint_items

FP = Fingerprint(fingerprint_items())


PG_ADMIN_URL = os.environ.get("LTRI_TEST_POSTGRES_URL")


@dataclass
class Location:
    """Where a test's store lives: a folder (SQLite) or a database URL plus a data folder (PostgreSQL)."""

    target: str | Path  # what create / open take
    data_dir: Path | None
    files: Path  # the folder holding kv/ and faiss/
    db_url: str  # for counting rows directly

    def create(self, fingerprint: Fingerprint = FP) -> SqlSpanStore:
        return SqlSpanStore.create(self.target, fingerprint, data_dir=self.data_dir)

    def open(self, fingerprint: Fingerprint | None = FP, **kwargs) -> SqlSpanStore:
        return SqlSpanStore.open(self.target, fingerprint, data_dir=self.data_dir, **kwargs)

    def worker_args(self) -> list[str]:
        return [str(self.target)] + ([str(self.data_dir)] if self.data_dir else [])


@pytest.fixture(params=["sqlite", "postgresql"])
def loc(request, tmp_path: Path):
    if request.param == "sqlite":
        yield Location(tmp_path / "mem", None, tmp_path / "mem", f"sqlite:///{tmp_path / 'mem' / 'meta.sqlite'}")
        return
    if not PG_ADMIN_URL:
        pytest.skip("PostgreSQL: set LTRI_TEST_POSTGRES_URL to a server's admin URL (.ci/run starts one)")
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"ltri_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {name}"))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield Location(url, tmp_path / "files", tmp_path / "files", url)
    finally:
        with admin.connect() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
