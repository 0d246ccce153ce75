"""What every ``ltri-rag`` command shares: output (text or ``--json``), progress, the ``--config`` file, the store
folder and its ``ltri-rag.json`` note, and loading the model.

A store folder is a :class:`~ltri_rag.KVMemory` folder (``meta.sqlite``, ``kv/``, ``faiss/``) plus ``ltri-rag.json``,
which remembers the model the store was created with, so that later commands need no ``--model``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from ltri_rag.config import FAST_PRESET, LtriConfig

__all__ = ["STORE_NOTE", "CliError", "Output", "UsageError", "is_store", "load_config_file", "read_note", "write_note"]

log = logging.getLogger("ltri_rag.cli")

STORE_NOTE = "ltri-rag.json"
DEFAULT_STORE = "ltri-store"
STORE_ENV = "LTRI_STORE"


class CliError(Exception):
    """A runtime error the command line reports as one line on stderr (exit code 1)."""


class UsageError(CliError):
    """A bad argument value found only once the command runs (e.g. a layer the model does not have): one line on
    stderr, exit code 2 like argparse's usage errors."""


# ------------------------------------------------------------------------------------------------- output
class Output:
    """Where a command writes: results to stdout (text, or one JSON document with ``--json``), status lines and
    progress bars to stderr (only when stdout and stderr are terminals, or with ``--verbose``).

    Args:
        json_mode: ``--json`` was given: text results are suppressed and :meth:`json` prints the result.
        verbose: ``--verbose`` count.
        stdout: Stream for results (default ``sys.stdout`` at call time).
        stderr: Stream for status and progress (default ``sys.stderr`` at call time).
    """

    def __init__(self, json_mode: bool = False, verbose: int = 0, stdout: TextIO | None = None,
                 stderr: TextIO | None = None) -> None:
        self.json_mode, self.verbose = json_mode, verbose
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        tty = _isatty(self.stdout) and _isatty(self.stderr)
        self.progress = tty and not json_mode
        """Show progress bars (stdout and stderr are terminals and no ``--json``)."""

    def text(self, line: str = "", *, end: str = "\n") -> None:
        """Print a result line (nothing in ``--json`` mode)."""
        if not self.json_mode:
            self.stdout.write(line + end)
            self.stdout.flush()

    def json(self, value: Any) -> None:
        """Print ``value`` as JSON (``--json`` mode only)."""
        if self.json_mode:
            self.stdout.write(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
            self.stdout.flush()

    def status(self, line: str) -> None:
        """A status line on stderr, shown on a terminal or with ``--verbose``."""
        if self.progress or self.verbose:
            self.stderr.write(line + "\n")
            self.stderr.flush()

    @contextmanager
    def timed(self, what: str) -> Iterator[dict[str, float]]:
        """Time a block: ``with out.timed("load model") as t: ...``; ``t["s"]`` holds the seconds afterwards."""
        box = {"s": 0.0}
        self.status(f"{what}...")
        start = time.perf_counter()
        try:
            yield box
        finally:
            box["s"] = time.perf_counter() - start
            log.info("%s: %.1f s", what, box["s"])


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------- --config
_FIELDS = {f.name for f in dataclasses.fields(LtriConfig)}


def load_config_file(path: str) -> dict[str, Any]:
    """Read ``--config``: a TOML file (or YAML, when PyYAML is installed) of :class:`LtriConfig` fields.

    Every key must be a field (the error names an unknown key and suggests close ones), and the values must make a
    valid config with the others at their defaults. Used as an argparse ``type``, so errors exit with code 2.

    Raises:
        argparse.ArgumentTypeError: missing or unreadable file, bad syntax, an unknown key or a bad value.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise argparse.ArgumentTypeError(f"config file not found: {path}")
    suffix = file.suffix.lower()
    try:
        raw = file.read_bytes()
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise argparse.ArgumentTypeError(f"{path}: YAML needs PyYAML (pip install pyyaml); or write the "
                                                 "config as TOML") from None
            data = yaml.safe_load(raw.decode("utf-8")) or {}
        else:
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
    except argparse.ArgumentTypeError:
        raise
    except Exception as err:  # noqa: BLE001 - any parse error: reported with the file name
        kind = "YAML" if suffix in (".yaml", ".yml") else "TOML"
        raise argparse.ArgumentTypeError(f"{path} is not valid {kind}: {err}") from None
    if not isinstance(data, Mapping):
        raise argparse.ArgumentTypeError(f"{path}: expected a table of LtriConfig fields, got {type(data).__name__}")
    for key in data:
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key), sorted(_FIELDS), n=2)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise argparse.ArgumentTypeError(f"{path}: unknown LtriConfig key {key!r}{hint}")
    overrides = dict(data)
    try:
        LtriConfig(**overrides)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"{path}: {err}") from None
    return overrides


def config_overrides(file_fields: Mapping[str, Any] | None, fast: bool) -> dict[str, Any]:
    """The LtriConfig fields the command line sets: with ``--fast`` the preset's
    (:data:`~ltri_rag.config.FAST_PRESET`), then the ``--config`` file's, which win."""
    return {**(FAST_PRESET if fast else {}), **(file_fields or {})}


def make_config(base: LtriConfig | None, overrides: Mapping[str, Any] | None) -> LtriConfig:
    """``base`` (default ``LtriConfig()``) with ``overrides`` applied; errors name the file's bad value."""
    config = base or LtriConfig()
    if not overrides:
        return config
    try:
        return config.replace(**dict(overrides))
    except (TypeError, ValueError) as err:
        raise CliError(f"--config: {err}") from None


# ------------------------------------------------------------------------------------------------- store folder
def store_path(value: str | None) -> Path:
    """The store folder: ``--store``, else ``$LTRI_STORE``, else ``./ltri-store``."""
    return Path(value or os.environ.get(STORE_ENV) or DEFAULT_STORE).expanduser()


def is_store(path: Path) -> bool:
    """Whether ``path`` is a KV memory store folder (it holds ``meta.sqlite``)."""
    return (path / "meta.sqlite").is_file()


def read_note(path: Path) -> dict[str, Any]:
    """The store's ``ltri-rag.json`` (empty when the store was made without the command line)."""
    try:
        data = json.loads((path / STORE_NOTE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_note(path: Path, note: Mapping[str, Any]) -> None:
    """Write ``ltri-rag.json`` (atomically)."""
    tmp = path / (STORE_NOTE + ".tmp")
    tmp.write_text(json.dumps(dict(note), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path / STORE_NOTE)


def open_raw_store(path: Path, *, read_only: bool) -> Any:
    """Open the store folder without a model (for ``ls``, ``rm``, ``stats``, ``verify``).

    Raises:
        CliError: there is no store at ``path``.
    """
    from ltri_rag.memory_stores import resolve_store

    if not is_store(path):
        raise CliError(f"no store at {str(path)!r}; create one with: ltri-rag ingest PATH... --store {path}")
    return resolve_store("sql").open(path, None, read_only=read_only)


def fingerprint_summary(store: Any) -> dict[str, Any]:
    """The store fingerprint's model and shape keys (not the per-field config)."""
    return {key: value for key, value in store.fingerprint.items() if not key.startswith("config.")}


def stored_config(store: Any) -> LtriConfig:
    """The :class:`LtriConfig` the store was ingested with."""
    from ltri_rag.memory_fingerprint import config_from_fingerprint

    return config_from_fingerprint(store.fingerprint)
