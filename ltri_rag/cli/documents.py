"""The files ``ltri-rag ingest`` reads: paths, folders and glob patterns expanded to ``.txt`` / ``.md`` (and
``.pdf`` when the ``pypdf`` package is installed) files, every one read and checked before anything is written.

Document ids are the files' paths relative to the folder or pattern root they were found under, prefixed with that
root's name (``docs/a.txt``, ``docs/sub/b.md``); a file named on its own is its file name (``notes.txt``). Two inputs
giving the same id are an error naming both files.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ltri_rag.cli.runtime import CliError

__all__ = ["TEXT_SUFFIXES", "InputDocument", "collect_documents", "pdf_available", "read_document"]

TEXT_SUFFIXES = (".txt", ".md")
PDF_SUFFIX = ".pdf"
_GLOB_CHARS = "*?["
_MAX_PROBLEMS = 3


@dataclass(frozen=True)
class InputDocument:
    """One file to ingest.

    Attributes:
        doc_id: Its id in the store.
        path: The file.
        text: Its text (decoded, checked non-empty).
    """

    doc_id: str
    path: Path
    text: str


def pdf_available() -> bool:
    """Whether the ``pypdf`` package (a small pure-Python PDF reader) is installed."""
    return importlib.util.find_spec("pypdf") is not None


def _suffixes() -> tuple[str, ...]:
    return TEXT_SUFFIXES + ((PDF_SUFFIX,) if pdf_available() else ())


def read_document(path: Path) -> str:
    """The text of ``path``: UTF-8 (a BOM is dropped) for ``.txt`` / ``.md``, the pages' text for ``.pdf``.

    Raises:
        CliError: unreadable, not valid UTF-8 (the offset and byte are named), a PDF without ``pypdf``, an
            unsupported suffix, or no text.
    """
    suffix = path.suffix.lower()
    if suffix == PDF_SUFFIX:
        if not pdf_available():
            raise CliError(f"{path}: reading PDF files needs the pypdf package (pip install pypdf); or convert it to "
                           ".txt")
        try:
            from pypdf import PdfReader

            text = "\n\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)
        except Exception as err:  # noqa: BLE001 - any parser failure, named with the file
            raise CliError(f"{path}: cannot read the PDF ({type(err).__name__}: {err})") from None
    elif suffix in TEXT_SUFFIXES:
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise CliError(f"{path}: cannot read ({err.strerror or err})") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise CliError(f"{path}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                           "convert it to UTF-8 first") from None
    else:
        raise CliError(f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; ingest reads "
                       f"{', '.join(_suffixes())} files")
    if not text.strip():
        raise CliError(f"{path}: the file holds no text")
    return text


def _walk(root: Path) -> list[Path]:
    """Supported files under ``root`` (hidden files and folders skipped), sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in _suffixes():
                found.append(Path(folder) / name)
    return found


def _prefixed(root: Path, path: Path) -> str:
    """``path``'s id: its path relative to ``root``, prefixed with ``root``'s name (none for the current folder)."""
    rel = Path(os.path.relpath(path, root)).as_posix()
    name = root.resolve().name if str(root) not in ("", ".") else ""
    return f"{name}/{rel}" if name else rel


def _glob_root(pattern: str) -> Path:
    """The part of a glob pattern before its first wildcard component (ids are relative to it)."""
    fixed: list[str] = []
    for part in Path(pattern).parts:
        if any(c in part for c in _GLOB_CHARS):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _expand(arg: str) -> list[tuple[str, Path]]:
    """``(id, path)`` of the files one command-line argument names."""
    path = Path(arg).expanduser()
    if path.is_file():
        return [(path.name, path)]
    if path.is_dir():
        return [(_prefixed(path, p), p) for p in _walk(path)]
    if any(c in arg for c in _GLOB_CHARS):
        pattern = os.path.expanduser(arg)
        root = _glob_root(pattern)
        out: list[tuple[str, Path]] = []
        for match in sorted(glob.glob(pattern, recursive=True)):
            m = Path(match)
            if m.is_file() and m.suffix.lower() in _suffixes():
                out.append((_prefixed(root, m), m))
            elif m.is_dir():
                out.extend((_prefixed(root, p), p) for p in _walk(m))
        if not out:
            raise CliError(f"no {'/'.join(_suffixes())} files match {arg!r}")
        return out
    raise CliError(f"no such file or folder: {arg}")


def collect_documents(args: list[str]) -> list[InputDocument]:
    """Expand and read every input, checking all of them before returning.

    Files found in folders or by patterns with an unsupported suffix are left out; a file named on its own with an
    unsupported suffix, a missing path, a pattern matching nothing, an unreadable, non-UTF-8 or empty file, or two
    files with one id are errors.

    Raises:
        CliError: the first few problems, in one line (nothing is ingested then).
    """
    if not args:
        raise CliError("no files given")
    problems: list[str] = []
    entries: list[tuple[str, Path]] = []
    for arg in args:
        try:
            entries.extend(_expand(arg))
        except CliError as err:
            problems.append(str(err))
    seen: dict[str, Path] = {}
    unique: list[tuple[str, Path]] = []
    for doc_id, path in entries:
        if doc_id in seen:
            if seen[doc_id].resolve() == path.resolve():
                continue  # the same file reached twice (a folder and a pattern): read once
            problems.append(f"{seen[doc_id]} and {path} would both get the id {doc_id!r}; ingest them separately "
                            "or rename one")
            continue
        seen[doc_id] = path
        unique.append((doc_id, path))
    docs: list[InputDocument] = []
    for doc_id, path in unique:
        try:
            docs.append(InputDocument(doc_id, path, read_document(path)))
        except CliError as err:
            problems.append(str(err))
    if problems:
        more = f" (and {len(problems) - _MAX_PROBLEMS} more problems)" if len(problems) > _MAX_PROBLEMS else ""
        raise CliError("; ".join(problems[:_MAX_PROBLEMS]) + more + "; nothing was ingested")
    if not docs:
        raise CliError(f"no {'/'.join(_suffixes())} files found in {' '.join(args)}")
    return docs
