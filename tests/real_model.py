"""Where the tests find the real Qwen2.5-Coder-0.5B GGUF file (the real-model tests skip without it, except on CI).

In order: ``$LTRI_QWEN_GGUF``; ``~/models/qwen2.5-coder-0.5b/`` (``fetch-models.sh ~/models qwen2.5-coder-0.5b``, what
CI does); the model cache of ``ltri-rag`` (``$LTRI_MODELS_DIR`` or ``~/.cache/ltri-rag/models``, where ``ltri-rag
demo`` puts it).
"""

from __future__ import annotations

import os
from pathlib import Path

from ltri_rag.models import default_cache_dir

_NAME = "qwen2.5-coder-0.5b"
_FILE = "qwen2.5-coder-0.5b.gguf"


def qwen_gguf() -> Path:
    """The first existing candidate path (or the first candidate, for the skip message)."""
    env = os.environ.get("LTRI_QWEN_GGUF")
    if env:
        return Path(env).expanduser()
    candidates = [Path("~/models").expanduser() / _NAME / _FILE, default_cache_dir() / _NAME / _FILE]
    return next((path for path in candidates if path.is_file()), candidates[0])


QWEN_GGUF = qwen_gguf()
