"""The checkout's ``kernels/`` folder must not shadow an installed top-level ``kernels`` package (Hugging Face's,
which transformers >= 5.25 imports) when Python runs from the checkout's root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _top_level_kernels(extra: list[str]) -> str:
    code = ("import sys; sys.path[:0] = " + repr([str(ROOT), *extra]) + "; import kernels; "
            "print(kernels.__file__); print(getattr(kernels, 'MARK', '-'))")
    # -S: no site-packages, so only the paths given here are searched (the test venv may hold the real package)
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout


def test_an_installed_kernels_package_wins_over_the_checkout_folder(tmp_path) -> None:
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARK = 'installed'\n")
    out = _top_level_kernels([str(tmp_path / "site")])
    assert str(fake / "__init__.py") in out and "installed" in out


def test_without_one_the_folder_is_imported_as_before() -> None:
    out = _top_level_kernels([])
    assert str(ROOT / "kernels" / "__init__.py") in out


def test_a_broken_installed_package_leaves_the_folder(tmp_path) -> None:
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('broken install')\n")
    out = _top_level_kernels([str(tmp_path / "site")])
    assert str(ROOT / "kernels" / "__init__.py") in out
