"""Shared setup of the integration tests: the real model (loaded once per test session) and the essays."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest

import ltri_rag  # noqa: F401  (first: see tests/unit/tiny_tokenizer.py)
from tests.real_model import QWEN_GGUF

QWEN = QWEN_GGUF  # see tests/real_model.py
QWEN_MISSING = (f"model file {QWEN} not fetched (bash ../shared/assets/fetch-models.sh ~/models qwen2.5-coder-0.5b; "
                "CI always fetches it)")
# skip without the model file, except on CI, where its absence is an error
needs_qwen = pytest.mark.skipif(not QWEN.is_file() and not os.environ.get("CI"), reason=QWEN_MISSING)


@pytest.fixture
def cpu_threads():
    """Torch on every CPU core for the test (test modules on tiny models set it to one thread), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)


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


ESSAY_EXCERPTS = ("boss", "apple", "submarine")  # the first 1,500 characters of each (~1K Qwen tokens in all)
QWEN_CONFIG = {"mode": "ltri", "local_window": 512, "budget": 512, "chunk_size": 512, "num_sink_tokens": 64}


def essay_texts() -> dict[str, str]:
    """``{name: the first 1,500 characters}`` of a few essays; "boss" says the author worked with over 200
    founders."""
    folder = essays_dir()
    return {name: (folder / f"{name}.txt").read_text(encoding="utf-8")[:1500] for name in ESSAY_EXCERPTS}


_ESSAY_MEMORY: dict[str, Any] = {}


def essay_memory() -> Any:
    """A :class:`KVMemory` over :func:`essay_texts` on Qwen, built once per test session (~8 s) in a temporary
    folder removed at exit. Tests must not change it."""
    if "memory" not in _ESSAY_MEMORY:
        import atexit
        import shutil
        import tempfile

        texts = essay_texts()
        model, tokenizer = qwen()
        folder = tempfile.mkdtemp(prefix="ltri-essays-")
        memory = ltri_rag.KVMemory.create(f"{folder}/m", model, tokenizer, ltri_rag.LtriConfig(**QWEN_CONFIG))
        memory.add_documents(list(texts.values()), [{"essay": name} for name in texts], list(texts), progress=False)
        atexit.register(shutil.rmtree, folder, True)
        atexit.register(memory.close)
        _ESSAY_MEMORY["memory"] = memory
    return _ESSAY_MEMORY["memory"]
