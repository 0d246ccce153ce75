"""Seeded long-context task generators on real text (the passkey task for now).

Text comes from a data directory: ``$LTRI_DATA_DIR`` if set, else ``../shared/data`` beside the repository
(the layout of the development machines). It must hold ``paul_graham_essays/*.txt``.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PasskeySample", "data_dir", "haystack_text", "passkey_sample", "passkey_correct"]

_REPO = Path(__file__).resolve().parent.parent

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.\n\n")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def data_dir() -> Path:
    """The data directory (see module docstring); raises FileNotFoundError naming where it looked."""
    env = os.environ.get("LTRI_DATA_DIR")
    path = Path(env) if env else _REPO.parent / "shared" / "data"
    if not (path / "paul_graham_essays").is_dir():
        raise FileNotFoundError(f"no paul_graham_essays/ under data directory {path}; set LTRI_DATA_DIR")
    return path


def haystack_text(root: Path | None = None) -> str:
    """All Paul Graham essays concatenated in file-name order (about 154K tokens)."""
    folder = (root or data_dir()) / "paul_graham_essays"
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt")))


@dataclass
class PasskeySample:
    """One passkey prompt.

    Attributes:
        prompt: The full prompt text.
        answer: The 5-digit pass key.
        depth: Relative position of the needle in the haystack, in [0, 1].
        num_tokens: Prompt length in tokens.
    """

    prompt: str
    answer: str
    depth: float
    num_tokens: int


def passkey_sample(tokenizer: Any, num_tokens: int, depth: float, seed: int, haystack: str | None = None
                   ) -> PasskeySample:
    """A prompt of about ``num_tokens`` tokens with a random 5-digit pass key at relative ``depth``.

    The haystack (real essays, repeated if the target is longer than the corpus) is cut at a sentence end;
    the needle goes in at the sentence boundary nearest to ``depth``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    text = haystack if haystack is not None else haystack_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    overhead = len(tokenizer(INTRO + NEEDLE.format(key=key) + QUESTION, add_special_tokens=False)["input_ids"])
    budget = max(num_tokens - overhead, 16)
    reps = -(-budget // len(ids))
    body_ids = (ids + tokenizer("\n\n", add_special_tokens=False)["input_ids"]) * reps
    body = tokenizer.decode(body_ids[:budget])
    body = body[: body.rfind(".") + 1] or body
    target = int(len(body) * depth)
    cut = body.rfind(". ", 0, target)
    cut = 0 if cut < 0 or depth == 0.0 else cut + 1
    prompt = INTRO + body[:cut] + NEEDLE.format(key=key) + body[cut:] + QUESTION
    n = len(tokenizer(prompt)["input_ids"])
    return PasskeySample(prompt=prompt, answer=key, depth=depth, num_tokens=n)


def passkey_correct(prediction: str, answer: str) -> bool:
    """RULER-style contains match on the generated text."""
    return answer in prediction
