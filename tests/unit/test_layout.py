"""Package layout: import direction between the four source folders, and how they are installed.

The repository holds four folders installed as one package (see ``[tool.setuptools.package-dir]``)::

    ltri_rag/      -> ltri_rag               (core)
    kernels/       -> ltri_rag.kernels       (imports nothing else of ltri_rag)
    storage/       -> ltri_rag.storage       (may use core, never integrations)
    integrations/  -> ltri_rag.integrations  (may use anything)
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {"ltri_rag": "ltri_rag", "kernels": "ltri_rag.kernels", "storage": "ltri_rag.storage",
           "integrations": "ltri_rag.integrations"}
TOP_LEVEL_FOLDERS = ("kernels", "storage", "integrations")


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of the modules a source file imports (``from X import n`` counts ``X`` and ``X.n``).

    Args:
        source: Python source.
        module: The file's dotted module name once installed (``ltri_rag.kernels.attention``).
        is_package: Whether the file is a package ``__init__``.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def violations(folder: str, names: set[str]) -> list[str]:
    """Imports a file of ``folder`` must not make."""
    bad = [n for n in names if n.split(".")[0] in TOP_LEVEL_FOLDERS]  # only importable from the repo root
    if folder == "kernels":
        # ``from ltri_rag import kernels`` yields {"ltri_rag", "ltri_rag.kernels"}: the bare parent is fine only then
        parents_ok = {"ltri_rag"} if any(_within(n, "ltri_rag.kernels") for n in names) else set()
        bad += [n for n in names if _within(n, "ltri_rag") and not _within(n, "ltri_rag.kernels")
                and n not in parents_ok]
    elif folder == "ltri_rag":
        bad += [n for n in names if _within(n, "ltri_rag.storage") or _within(n, "ltri_rag.integrations")]
    elif folder == "storage":
        bad += [n for n in names if _within(n, "ltri_rag.integrations")]
    return sorted(bad)


def _sources() -> list[tuple[str, Path, str, bool]]:
    out = []
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((folder, path, ".".join([package, *parts]), path.name == "__init__.py"))
    return out


# --------------------------------------------------------------------------------------------- the checker
def test_checker_resolves_relative_imports() -> None:
    src = "from . import attention\nfrom .scoring import span_scores\nfrom .. import config\nimport torch\n"
    names = imported_modules(src, "ltri_rag.kernels.attention", is_package=False)
    assert names == {"ltri_rag.kernels", "ltri_rag.kernels.attention", "ltri_rag.kernels.scoring",
                     "ltri_rag.kernels.scoring.span_scores", "ltri_rag", "ltri_rag.config", "torch"}
    assert imported_modules("from . import x", "ltri_rag.kernels", is_package=True) == {
        "ltri_rag.kernels", "ltri_rag.kernels.x"}


@pytest.mark.parametrize("folder,source,expected", [
    ("kernels", "from ltri_rag.cache import LtriCache", ["ltri_rag.cache", "ltri_rag.cache.LtriCache"]),
    ("kernels", "import ltri_rag", ["ltri_rag"]),
    ("kernels", "from .. import config", ["ltri_rag", "ltri_rag.config"]),
    ("kernels", "def f():\n    from ltri_rag import pool\n", ["ltri_rag", "ltri_rag.pool"]),
    ("kernels", "from ltri_rag import kernels", []),
    ("kernels", "from ltri_rag.kernels.attention import local_attention", []),
    ("ltri_rag", "from ltri_rag.storage import store", ["ltri_rag.storage", "ltri_rag.storage.store"]),
    ("ltri_rag", "from ltri_rag import integrations", ["ltri_rag.integrations"]),
    ("ltri_rag", "import ltri_rag.integrations.langchain", ["ltri_rag.integrations.langchain"]),
    ("ltri_rag", "from ltri_rag.kernels import span_scores", []),
    ("storage", "from ltri_rag.integrations import x", ["ltri_rag.integrations", "ltri_rag.integrations.x"]),
    ("storage", "from ltri_rag.pool import PagedKVPool", []),
    ("integrations", "from kernels.scoring import span_scores", ["kernels.scoring", "kernels.scoring.span_scores"]),
])
def test_checker_flags_violations(folder: str, source: str, expected: list[str]) -> None:
    module = {"kernels": "ltri_rag.kernels.x", "ltri_rag": "ltri_rag.x", "storage": "ltri_rag.storage.x",
              "integrations": "ltri_rag.integrations.x"}[folder]
    assert violations(folder, imported_modules(source, module, is_package=False)) == expected


# ------------------------------------------------------------------------------------------------ the repo
def test_every_folder_has_sources() -> None:
    found = {folder for folder, *_ in _sources()}
    assert found == set(FOLDERS)
    assert sum(1 for folder, *_ in _sources() if folder == "kernels") >= 2


def test_import_direction() -> None:
    problems = {}
    for folder, path, module, is_package in _sources():
        bad = violations(folder, imported_modules(path.read_text(encoding="utf-8"), module, is_package))
        if bad:
            problems[str(path.relative_to(REPO))] = bad
    assert problems == {}


def test_kernels_import_only_torch_and_themselves() -> None:
    """Kernels depend on torch (and triton) and the standard library only: no transformers, numpy, tqdm..."""
    allowed_roots = {"torch", "triton", "ltri_rag"} | set(sys.stdlib_module_names)
    for folder, path, module, is_package in _sources():
        if folder != "kernels":
            continue
        roots = {n.split(".")[0] for n in imported_modules(path.read_text(encoding="utf-8"), module, is_package)}
        assert roots <= allowed_roots, (path, roots - allowed_roots)


# --------------------------------------------------------------------------------------------- installation
def test_subpackages_import_from_their_folders() -> None:
    for folder, package in FOLDERS.items():
        mod = importlib.import_module(package)
        assert Path(mod.__file__).resolve() == (REPO / folder / "__init__.py").resolve(), package
    kernels = importlib.import_module("ltri_rag.kernels")
    assert kernels.__all__ and all(callable(getattr(kernels, name)) for name in kernels.__all__)
    from ltri_rag.kernels import attention_with_lse
    from ltri_rag.kernels.attention import attention_with_lse as same

    assert attention_with_lse is same


_PROBE = """
import importlib.util, json
out = {}
for name in ("kernels", "storage", "integrations", "ltri_rag"):
    spec = importlib.util.find_spec(name)
    out[name] = None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or [])))
print(json.dumps(out))
"""


def test_folders_are_not_top_level_packages_when_installed(tmp_path: Path) -> None:
    """From outside the repository only ``ltri_rag`` is installed: ``kernels`` etc. are not this repo's folders."""
    import json

    # -I: no PYTHONPATH, no user site, no current directory on sys.path; the venv's site-packages still load
    proc = subprocess.run([sys.executable, "-I", "-c", _PROBE], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ltri_rag"] is not None and Path(out["ltri_rag"]).resolve() == (REPO / "ltri_rag" / "__init__.py")
    for name in TOP_LEVEL_FOLDERS:  # absent, or another distribution's package (the venv may live in the repo)
        assert out[name] is None or not Path(out[name]).resolve().is_relative_to(REPO / name), (name, out[name])


def test_transformers_imports_from_the_repo_root() -> None:
    """From the repo root, transformers' probe for the Hub ``kernels`` package may find the folder ``kernels/``;
    its lazy ``__init__`` must neither break the import nor pass for that package. Where the Hub package is
    installed (transformers >= 5.25 depends on it), ``import kernels`` must give that package, not the folder."""
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    code = ("from transformers import LlamaForCausalLM\n"
            "from transformers.utils import is_kernels_available\n"
            "import kernels\n"
            "print(kernels.__file__)\n"
            "print(is_kernels_available())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    *_, where, available = proc.stdout.strip().splitlines()
    assert (Path(where).resolve() != REPO / "kernels" / "__init__.py") == installed, where
    if not installed:
        assert available == "False"
