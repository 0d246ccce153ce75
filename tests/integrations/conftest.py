"""Shared setup of the integration tests: the real model (loaded once per test session) and the essays."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest

import ltri_rag  # noqa: F401  (first: see tests/unit/tiny_tokenizer.py)

QWEN = Path(os.environ.get("LTRI_QWEN_GGUF", "~/models/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b.gguf")).expanduser()
QWEN_MISSING = (f"model file {QWEN} not fetched (bash ../shared/assets/fetch-models.sh ~/models qwen2.5-coder-0.5b; "
                "CI always fetches it)")
# skip without the model file, except on CI, where its absence is an error
needs_qwen = pytest.mark.skipif(not QWEN.is_file() and not os.environ.get("CI"), reason=QWEN_MISSING)


@functools.lru_cache(maxsize=1)
def qwen() -> tuple[Any, Any]:
    """``(model, tokenizer)`` of Qwen2.5-Coder-0.5B, float32 on CPU, loaded once per test session (~1 min)."""
    return ltri_rag.load_model(str(QWEN), dtype="float32", device="cpu")


def essays_dir() -> Path:
    """The Paul Graham essays folder ($LTRI_DATA_DIR); skips the test when absent (an error on CI)."""
    from benchmarks.tasks import data_dir

    try:
        return data_dir() / "paul_graham_essays"
    except FileNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("no essays (set LTRI_DATA_DIR)")
