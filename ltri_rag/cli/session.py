"""Loading the model and opening (or creating) the store's :class:`~ltri_rag.KVMemory` for a command.

The model is, in order: ``--model``; the one the store was created with (its ``ltri-rag.json``); the default
(:data:`ltri_rag.models.DEFAULT_MODEL`). Short names are resolved by :func:`ltri_rag.models.resolve_model`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ltri_rag.cli.runtime import (
    CliError,
    Output,
    is_store,
    make_config,
    open_raw_store,
    read_note,
    store_path,
    stored_config,
    write_note,
)
from ltri_rag.models import DEFAULT_MODEL, resolve_model

__all__ = ["Loaded", "load_for", "open_memory"]

log = logging.getLogger("ltri_rag.cli")


@dataclass
class Loaded:
    """A model loaded for a command.

    Attributes:
        model: The Hugging Face causal LM.
        tokenizer: Its tokenizer.
        name: The model as the user (or the store) named it.
        source: What it was loaded from (a path or a Hub id).
        how: How the name was resolved (see :class:`ltri_rag.models.ResolvedModel`).
        seconds: Resolution and load time.
    """

    model: Any
    tokenizer: Any
    name: str
    source: str
    how: str
    seconds: float = 0.0


@dataclass
class OpenedMemory:
    """A store opened with its model. ``created``: the command created the store."""

    memory: Any
    path: Path
    loaded: Loaded
    created: bool
    timings: dict[str, float] = field(default_factory=dict)


def _quiet_transformers(out: Output) -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - a dependency
        return
    if not out.verbose:
        hf_logging.set_verbosity_error()
    if not out.progress:
        hf_logging.disable_progress_bar()


@contextmanager
def _gguf_bar(*, enabled: bool) -> Iterator[None]:
    """Hide transformers' GGUF de-quantisation progress bar (a plain tqdm, not switched off by its logging
    settings) unless progress is shown."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if enabled or original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_for(args: argparse.Namespace, out: Output, note: dict[str, Any] | None = None) -> Loaded:
    """Resolve and load the model for ``args`` (``--model``, else the store's, else the default).

    Raises:
        CliError: the model cannot be found or loaded (the message names it).
    """
    import ltri_rag

    note = note or {}
    name = args.model or note.get("model") or DEFAULT_MODEL
    with out.timed(f"loading model {name}") as t:
        try:
            source, how = note.get("source"), "store"
            if args.model or not (isinstance(source, str) and Path(source).exists()):
                resolved = resolve_model(name, cache_dir=args.models_dir, hub=not args.offline,
                                         download=not args.offline, progress=out.progress)
                source, how = resolved.source, resolved.how
                if how == "path":  # remembered in the store's note: absolute, so any working folder finds it
                    source = name = str(Path(source).resolve())
            _quiet_transformers(out)
            with _gguf_bar(enabled=out.progress):
                model, tokenizer = ltri_rag.load_model(source, device=args.device, dtype=args.dtype,
                                                       gguf_cache=_gguf_cache(args))
        except (OSError, ValueError, RuntimeError, ImportError) as err:
            raise CliError(f"cannot load model {name!r}: {_first_line(err)}") from err
    log.info("model %s from %s (%s) in %.1f s", name, source, how, t["s"])
    return Loaded(model, tokenizer, name, str(source), how, t["s"])


def _gguf_cache(args: argparse.Namespace) -> Path | None:
    """Where the CLI keeps converted GGUF models: ``converted/`` in the model cache (so a second run loads in
    seconds, not a minute), unless ``$LTRI_GGUF_CACHE`` is set (``None``: ``load_model`` then reads it)."""
    from ltri_rag.loading import GGUF_CACHE_ENV
    from ltri_rag.models import default_cache_dir

    if GGUF_CACHE_ENV in os.environ:
        return None
    return Path(args.models_dir or default_cache_dir()) / "converted"


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _check_new_store_folder(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CliError(f"{str(path)!r} exists and is not an ltri-rag store; pick another --store")


def mismatch_message(path: Path, err: Exception, note: dict[str, Any]) -> str:
    """One line for a :class:`~ltri_rag.store.FingerprintMismatch`: the differing keys and the store's model."""
    keys = sorted(getattr(err, "differences", {}))
    made = f" (it was created with model {note['model']!r})" if note.get("model") else ""
    shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
    return (f"the store at {str(path)!r} was written with another model, tokenizer or config{made}; differing: "
            f"{shown}. Pass the store's --model (and no --config changing stored fields), or use another --store")


def open_memory(args: argparse.Namespace, out: Output, *, create: bool = False, read_only: bool = False
                ) -> OpenedMemory:
    """Load the model and open the store at ``--store`` (creating it when ``create`` and it does not exist).

    ``--config`` overrides are applied to the default config of a new store, or to the store's own config; changing a
    field the stored data depends on is refused (the differing keys are named).

    Raises:
        CliError: no store (and ``create`` is False), a non-store folder in the way, a model mismatch, a load error.
    """
    from ltri_rag import KVMemory
    from ltri_rag.store import FingerprintMismatch, StoreError

    path = store_path(args.store)
    exists = is_store(path)
    if not exists and not create:
        raise CliError(f"no store at {str(path)!r}; create one with: ltri-rag ingest PATH... --store {path}")
    if not exists:
        _check_new_store_folder(path)
    note = read_note(path) if exists else {}
    base = None
    if exists:
        raw = open_raw_store(path, read_only=True)
        try:
            base = stored_config(raw)
        finally:
            raw.close()
    config = make_config(base, args.config)
    loaded = load_for(args, out, note)
    options = {"store_options": {"read_only": True}} if read_only else {}
    try:
        if exists:
            memory = KVMemory.open(path, loaded.model, loaded.tokenizer, config, **options)
        else:
            path.mkdir(parents=True, exist_ok=True)
            try:
                memory = KVMemory.create(path, loaded.model, loaded.tokenizer, config)
                write_note(path, {"model": loaded.name, "source": loaded.source, "created_by": "ltri-rag"})
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)  # the folder was absent or empty: leave nothing behind
                raise
    except FingerprintMismatch as err:
        raise CliError(mismatch_message(path, err, note)) from err
    except StoreError as err:
        raise CliError(f"cannot open the store at {str(path)!r}: {_first_line(err)}") from err
    return OpenedMemory(memory, path, loaded, created=not exists, timings={"load_model_s": loaded.seconds})
