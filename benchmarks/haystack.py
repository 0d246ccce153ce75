"""Haystack text for the long-context tasks: the corpora, sentence / paragraph boundaries, token-budgeted cuts
and needle planting (the text helpers of :mod:`benchmarks.long_tasks`).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

_BOOKS = ("emma", "mansfield_park", "northanger_abbey", "persuasion", "pride_and_prejudice", "sense_and_sensibility")


# ---------------------------------------------------------------------------------------------------- text helpers
# A sentence ends at . ! or ? (plus closing quotes/brackets) followed by whitespace and a capital letter, digit or
# opening quote, or directly by a capital (the essays lost some paragraph breaks: "accelerating.We"). Titles such as
# "Mr." or "Mrs." are not ends.
_SENTENCE_END = re.compile(
    r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bEsq)(?<!\bCol)(?<!\bCapt)(?<!\bNo)(?<!\b[A-Z])"
    r"[.!?][\"'\u201d\u2019)\]]*(?=\s+[\"'\u201c\u2018(]?[A-Z0-9]|[A-Z])")
# A paragraph ends at a sentence end followed by a blank line.
_PARAGRAPH_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=[ \t]*\n[ \t]*\n)")
CHAPTER = re.compile(r"^[ \t]*chapter\s+[ivxlcdm\d]+\.?[ \t]*$", re.IGNORECASE | re.MULTILINE)


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def sentence_ends(text: str) -> list[int]:
    return [m.end() for m in _SENTENCE_END.finditer(text)]


def paragraph_ends(text: str) -> list[int]:
    return [m.end() for m in _PARAGRAPH_END.finditer(text)]


def nearest(points: list[int], target: float) -> int:
    """The element of sorted ``points`` nearest to ``target``."""
    i = bisect.bisect_left(points, target)
    best = [points[j] for j in (i - 1, i) if 0 <= j < len(points)]
    return min(best, key=lambda p: (abs(p - target), p))


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def num_special_tokens(tokenizer: Any) -> int:
    """Tokens the tokenizer adds to every string by default (BOS/EOS)."""
    return len(tokenizer("")["input_ids"])


class Tokenized:
    """A long text and, for each prefix length in tokens, the character where it ends."""

    def __init__(self, tokenizer: Any, text: str) -> None:
        self.text = text
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            self.ends: list[int] | None = [end for _, end in enc["offset_mapping"]]
            self.ids = enc["input_ids"]
        except (NotImplementedError, TypeError, ValueError, KeyError):  # slow tokenizer: no offsets
            self.ends = None
            self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self._tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.ids)

    def char_at(self, n: int) -> int:
        """Character offset where the first ``n`` tokens end."""
        n = max(0, min(n, len(self.ids)))
        if n == 0:
            return 0
        if self.ends is not None:
            return self.ends[n - 1]
        return min(len(self._tokenizer.decode(self.ids[:n])), len(self.text))


def tokenize_prefix(tokenizer: Any, text: str, tokens: int) -> Tokenized:
    """Tokenize a prefix of ``text`` that holds at least ``tokens`` tokens (or all of it), without tokenizing much
    more than needed."""
    probe = text[:20000]
    ratio = max(len(probe) / max(count_tokens(tokenizer, probe), 1), 0.5)  # characters per token
    n_chars = int(tokens * ratio * 1.1) + 2000
    while True:
        tok = Tokenized(tokenizer, text[:n_chars])
        if len(tok) >= tokens or n_chars >= len(text):
            return tok
        n_chars = int(n_chars * 1.5) + 1000


def cut_at_sentence(tok: Tokenized, tokens: int, total: int) -> str:
    """About ``tokens`` tokens of ``tok``'s text, ending at a sentence end.

    Prefers the last sentence end within ``[tokens - slack, tokens + 24]`` (``slack`` is 3% of the prompt's target
    ``total``); with none there (very long sentences), cuts at the last space before ``tokens``.
    """
    if tokens >= len(tok):
        return tok.text
    lo = tok.char_at(tokens - max(int(0.03 * total), 8))
    hi = tok.char_at(tokens + 24)
    window = tok.text[lo:hi + 64] + (" X" if hi + 64 >= len(tok.text) else "")  # sentinel: the text end is an end
    ends = [e for e in sentence_ends(window) if e <= hi - lo]
    if ends:
        return tok.text[:lo + ends[-1]]
    at = tok.char_at(tokens)
    space = tok.text.rfind(" ", lo, at)
    return tok.text[:space if space > 0 else at]


def plant(body: str, needles: list[tuple[float, str]], sep: str = " ", paragraphs: bool = False
           ) -> tuple[str, list[int]]:
    """Insert each ``(depth, text)`` at the boundary of ``body`` nearest to ``depth * len(body)``.

    Boundaries are sentence ends (``paragraphs``: paragraph ends where one is within 5% of the target), plus the
    start and end of ``body``. Returns the new text and each needle's character offset in it.
    """
    sentences = sorted({0, len(body), *sentence_ends(body)})
    par = sorted({0, len(body), *paragraph_ends(body)}) if paragraphs else []
    placed = []
    for order, (depth, text) in enumerate(needles):
        target = depth * len(body)
        at = nearest(sentences, target)
        if par:
            p = nearest(par, target)
            if abs(p - target) <= 0.05 * len(body):
                at = p
        placed.append((at, order, text))
    placed.sort()
    out, last, offsets = [], 0, [0] * len(needles)
    length, prev_at = 0, None
    for k, (at, order, text) in enumerate(placed):
        chunk = body[last:at]
        out.append(chunk)
        length += len(chunk)
        lead = sep if at > 0 or prev_at == at else ""
        offsets[order] = length + len(lead)
        piece = lead + text
        last_here = k + 1 == len(placed) or placed[k + 1][0] != at
        if last_here and at < len(body) and not body[at:at + len(sep)].isspace():
            piece += sep
        out.append(piece)
        length += len(piece)
        last, prev_at = at, at
    out.append(body[last:])
    return "".join(out), offsets


# ---------------------------------------------------------------------------------------------------- data loading
@lru_cache(maxsize=4)
def load_essays(root: str) -> tuple[str, ...]:
    folder = Path(root) / "paul_graham_essays"
    essays = tuple(p.read_text(encoding="utf-8").strip() for p in sorted(folder.glob("*.txt")))
    if not essays:
        raise FileNotFoundError(f"no essays in {folder}")
    return essays


@lru_cache(maxsize=4)
def load_books(root: str) -> tuple[str, ...]:
    folder = Path(root) / "austen"
    paths = [folder / f"{name}.txt" for name in _BOOKS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing Austen novels: {', '.join(missing)}")
    return tuple(p.read_text(encoding="utf-8").strip() for p in paths)


@lru_cache(maxsize=4)
def books_lower(root: str) -> str:
    return "\n".join(load_books(root)).lower()


@lru_cache(maxsize=4)
def essays_lower(root: str) -> str:
    return "\n".join(load_essays(root)).lower()


@dataclass(frozen=True)
class Squad:
    paragraphs: tuple[str, ...]  # every paragraph
    article_of: tuple[int, ...]  # article index of each paragraph
    questions: tuple[tuple[int, str, tuple[str, ...]], ...]  # (paragraph index, question, answers)


@lru_cache(maxsize=2)
def load_squad(root: str) -> Squad:
    path = Path(root) / "squad" / "squaddev_v1.1.json"
    if not path.is_file():
        raise FileNotFoundError(f"no SQuAD dev set at {path}")
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    paragraphs, article_of, questions = [], [], []
    for a, article in enumerate(data):
        for para in article["paragraphs"]:
            p = len(paragraphs)
            paragraphs.append(" ".join(para["context"].split()))
            article_of.append(a)
            for qa in para["qas"]:
                question = " ".join(qa["question"].split())
                answers = tuple(dict.fromkeys(" ".join(x["text"].split()) for x in qa["answers"]))
                answers = tuple(x for x in answers if x)
                # Keep questions whose answers are all non-empty and none is given away by the question itself.
                if answers and not any(normalise(x) in normalise(question) for x in answers):
                    questions.append((p, question, answers))
    return Squad(tuple(paragraphs), tuple(article_of), tuple(questions))


_TOKEN_CACHE: dict[tuple[int, str], tuple[Any, Any]] = {}


def per_tokenizer(tokenizer: Any, key: str, compute: Callable[[], Any]) -> Any:
    """Memoize ``compute()`` per (tokenizer object, key); a few entries only."""
    hit = _TOKEN_CACHE.get((id(tokenizer), key))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    if len(_TOKEN_CACHE) >= 8:
        _TOKEN_CACHE.clear()
    value = compute()
    _TOKEN_CACHE[(id(tokenizer), key)] = (tokenizer, value)
    return value


def squad_lengths(tokenizer: Any, root: str) -> list[int]:
    def compute() -> list[int]:
        squad = load_squad(root)
        return [len(ids) for ids in tokenizer(list(squad.paragraphs), add_special_tokens=False)["input_ids"]]
    return per_tokenizer(tokenizer, f"squad:{root}", compute)
