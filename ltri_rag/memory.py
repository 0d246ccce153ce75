"""``KVMemory``: a corpus ingested once into a persistent span store and queried by in-model retrieval.

::

    mem = ltri_rag.KVMemory.create("./mem", model, tokenizer, ltri_rag.LtriConfig(mode="ltri"))
    ids = mem.add_documents(texts, metadatas=[{"source": "a.txt"}, ...], collection="essays")
    hits = mem.retrieve("Who founded Viaweb?", k=4, collection="essays")       # spans with offsets, for citations
    answer = mem.generate("Who founded Viaweb?", collection="essays")            # answer.text, answer.spans
    mem.close()
    mem = ltri_rag.KVMemory.open("./mem", model, tokenizer)                     # refuses another model / tokenizer

Core code: the store is any :class:`~ltri_rag.store.SpanStore`, found by name through the ``ltri_rag.stores`` entry
point group (``"sql"`` is ``ltri_rag.storage.SqlSpanStore``, registered in ``pyproject.toml``) or given as a factory
class, so this module never imports the storage package. How documents are read and stored: see
:mod:`ltri_rag.memory_ingest`; how questions are matched and answered: :mod:`ltri_rag.memory_query`; what a store
must agree on with its opener: :mod:`ltri_rag.memory_fingerprint`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from typing_extensions import Self

from ltri_rag.cache import layer_sliding_windows
from ltri_rag.config import LtriConfig
from ltri_rag.engine import LtriSession, model_device
from ltri_rag.generation import Prompt, encode_prompt
from ltri_rag.hook import model_lock
from ltri_rag.memory_cache import DocumentCache
from ltri_rag.memory_coarse import CoarseScorer
from ltri_rag.memory_fingerprint import (WEIGHTS_VERSION, config_from_fingerprint, memory_fingerprint, model_shapes,
                                         stored_weights_version)
from ltri_rag.memory_ingest import (
    check_collection,
    check_ids,
    encode_document,
    ingest_document,
    prepare_input,
    record_bytes,
    sink_prefix_ids,
)
from ltri_rag.memory_query import (
    DEFAULT_RANKING,
    RANKINGS,
    MemoryAnswer,
    MemoryStream,
    decode,
    stream_pieces,
)
from ltri_rag.memory_search import MemorySearch
from ltri_rag.memory_stores import StoreFactory, resolve_store
from ltri_rag.store import (
    DocumentInfo,
    DocumentRecord,
    FingerprintMismatch,
    SpanHit,
    SpanStore,
    StoreError,
    StoreStats,
    VerifyReport,
)

__all__ = ["DEFAULT_COLLECTION", "KVMemory", "MemoryAnswer", "MemoryStream", "StoreFactory", "resolve_store"]

DEFAULT_COLLECTION = "default"


class KVMemory(MemorySearch):
    """A persistent corpus memory over one model: documents are read once into spans, index vectors and K/V, kept in
    a :class:`SpanStore`, and brought back into the model's span memory to answer questions.

    Prefer :meth:`create` / :meth:`open`; the constructor wraps an already opened store and checks its fingerprint.

    Args:
        store: An open span store.
        model: Hugging Face causal LM (the one the store was written with).
        tokenizer: Its tokenizer.
        config: Engine configuration (mode ``ltri`` or ``infllm``); ``None`` takes the one stored in the store.
        max_document_tokens: Longest document accepted by :meth:`add_documents` (longer ones are refused before
            anything is written; split them).
        max_memory_tokens: Most stored tokens :meth:`retrieve` / :meth:`generate` import into a session: when the
            candidate documents hold more, only those the coarse stage ranks first are imported (at least one; see
            ``coarse_bytes``).
        batch_bytes: Ingested documents are written to the store in batches of about this many tensor bytes.
        ranking: How :meth:`retrieve` scores spans from the model's attention (one of
            :data:`~ltri_rag.memory_query.RANKINGS`): ``excess`` (the default: the share of the question's attention
            beyond what a neutral question pays the span, read in one extra dry pass, so that documents' openings stop
            outranking the answer; measured in :mod:`ltri_rag.memory_query`), ``attention`` (the share of the
            question's attention), ``pmi``.
        cache_bytes: Byte budget of the cache of recently used documents' span memory, kept on the model's device
            (see :mod:`ltri_rag.memory_cache`: a repeated question skips the store's file reads and copies); 0
            turns it off.
        host_cache_bytes: Byte budget of the cache's second tier, in host memory (pinned on a GPU): documents
            pushed out of the device tier wait there, and come back without a file read. None (the default): 4 GiB
            when the model is on a GPU, 0 (off) on a CPU model, whose device tier is host memory already.
        prefetch: Documents read from the store ahead of the one being imported, by that many background threads
            (file reads and checksums overlap the import); 0 reads them one after another in the calling thread.
        coarse_bytes: Budget of the index vectors the coarse stage keeps (on the model's device) to rank documents
            by the question's attention over them (:mod:`ltri_rag.memory_coarse`; 4 bytes per vector value: about
            1.8 GB for 1M tokens of Qwen2.5-0.5B). A store whose vectors exceed it is ranked by the FAISS search
            with the question's mean query instead (at chance on the measured corpus); 0 always does.

    Raises:
        FingerprintMismatch: the store was written with another model, tokenizer or configuration.
        ValueError: ``config.mode`` keeps no span memory.
    """

    def __init__(self, store: SpanStore, model: nn.Module, tokenizer: Any, config: LtriConfig | None = None, *,
                 max_document_tokens: int = 1 << 20, max_memory_tokens: int = 1 << 17,
                 batch_bytes: int = 256 << 20, ranking: str = DEFAULT_RANKING, cache_bytes: int = 1 << 30,
                 host_cache_bytes: int | None = None, prefetch: int = 2, coarse_bytes: int = 4 << 30) -> None:
        if config is None:
            config = config_from_fingerprint(store.fingerprint)
        self._check_arguments(config, max_document_tokens=max_document_tokens, max_memory_tokens=max_memory_tokens,
                              batch_bytes=batch_bytes, ranking=ranking, prefetch=prefetch)
        self.ranking = ranking
        self.store, self.model, self.tokenizer, self.config = store, model, tokenizer, config
        self.max_document_tokens, self.max_memory_tokens, self.batch_bytes = (max_document_tokens,
                                                                               max_memory_tokens, batch_bytes)
        device = model_device(model)  # before the fingerprint: a model spread over devices is refused first
        self.sink_ids = sink_prefix_ids(tokenizer, config.num_sink_tokens)  # [num_sink_tokens]
        self.fingerprint = memory_fingerprint(model, tokenizer, config, self.sink_ids,
                                              stored_weights_version(store.fingerprint))
        differences = store.fingerprint.diff(self.fingerprint)
        if differences:
            raise FingerprintMismatch(differences)
        _, self.num_kv_heads, self.head_dim, self.kv_dtype = model_shapes(model)
        self.global_layers = [i for i, window in enumerate(layer_sliding_windows(model)) if window is None]
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.scaling = float(getattr(text_config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self._lock = model_lock(model)  # one model call at a time, shared with every other user of this model
        if host_cache_bytes is None:
            host_cache_bytes = 4 << 30 if device.type == "cuda" else 0
        self.document_cache = DocumentCache(cache_bytes, device, host_cache_bytes)
        self.prefetch = prefetch
        self._prefetch_pool: ThreadPoolExecutor | None = None
        self._coarse = (CoarseScorer(store, self.global_layers, self.scaling, device, coarse_bytes)
                        if coarse_bytes else None)
        self._neutral_queries: dict[int, torch.Tensor] | None = None

    _OPTIONS = frozenset({"max_document_tokens", "max_memory_tokens", "batch_bytes", "ranking", "cache_bytes",
                          "host_cache_bytes", "prefetch", "coarse_bytes"})

    @classmethod
    def _check_arguments(cls, config: Any, *, max_document_tokens: int = 1 << 20, max_memory_tokens: int = 1 << 17,
                         batch_bytes: int = 256 << 20, ranking: str = DEFAULT_RANKING, prefetch: int = 2,
                         **others: Any) -> None:
        """Raise for a bad configuration or option (before :meth:`create` makes a store that could not be opened)."""
        unknown = sorted(set(others) - cls._OPTIONS)
        if unknown:
            raise TypeError(f"unknown KVMemory option(s) {unknown}; known: {sorted(cls._OPTIONS)}")
        if not isinstance(config, LtriConfig):
            raise TypeError(f"config must be an LtriConfig, got {type(config).__name__}")
        if not config.retrieves:
            raise ValueError(f"KVMemory needs a mode with a span memory ('ltri' or 'infllm'), got {config.mode!r}")
        for name, value in (("max_document_tokens", max_document_tokens), ("max_memory_tokens", max_memory_tokens),
                            ("batch_bytes", batch_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
            raise ValueError(f"prefetch must be a non-negative int, got {prefetch!r}")
        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")

    # ------------------------------------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, path_or_url: str | os.PathLike[str], model: nn.Module, tokenizer: Any,
               config: LtriConfig | None = None, *, store: str | StoreFactory = "sql",
               store_options: Mapping[str, Any] | None = None, **options: Any) -> KVMemory:
        """Create an empty memory at ``path_or_url`` (a folder, or a database URL with
        ``store_options={"data_dir": ...}`` for the SQL store).

        Args:
            config: Engine configuration; default ``LtriConfig()`` (mode ``ltri``).
            store: Entry point name of the store (``"sql"``) or a factory class.
            store_options: Extra keyword arguments of the factory's ``create``.
            **options: ``max_document_tokens``, ``max_memory_tokens``, ``batch_bytes``, ``ranking``, ``cache_bytes``,
                ``host_cache_bytes``, ``prefetch``, ``coarse_bytes`` (see the class).
        """
        config = config or LtriConfig()
        cls._check_arguments(config, **options)  # nothing is created for arguments the memory would refuse
        model_device(model)  # nor for a model spread over devices
        factory = resolve_store(store)
        fingerprint = memory_fingerprint(model, tokenizer, config, sink_prefix_ids(tokenizer, config.num_sink_tokens))
        span_store = factory.create(path_or_url, fingerprint, **dict(store_options or {}))
        try:
            return cls(span_store, model, tokenizer, config, **options)
        except BaseException:
            span_store.close()
            raise

    @classmethod
    def open(cls, path_or_url: str | os.PathLike[str], model: nn.Module, tokenizer: Any,
             config: LtriConfig | None = None, *, store: str | StoreFactory = "sql",
             store_options: Mapping[str, Any] | None = None, **options: Any) -> KVMemory:
        """Open an existing memory; ``config=None`` takes the configuration it was written with.

        ``store_options`` go to the factory's ``open``: for the SQL store e.g. ``{"read_only": True}`` (a reader beside
        one writing process) or ``{"data_dir": ...}`` with a database URL.

        Raises:
            FingerprintMismatch: the model, tokenizer or configuration differ from the store's (each differing key
                is named, e.g. ``model.weights_sha256`` or ``config.span_max_len``).
        """
        model_device(model)  # a model spread over devices is refused before the store is opened
        factory = resolve_store(store)
        expected = None
        if config is not None:
            expected = memory_fingerprint(model, tokenizer, config, sink_prefix_ids(tokenizer, config.num_sink_tokens))
        try:
            span_store = factory.open(path_or_url, expected, **dict(store_options or {}))
        except FingerprintMismatch as err:
            stored_version = err.differences.get("model.weights_version", (WEIGHTS_VERSION,))[0]
            if stored_version is not None or config is None:
                raise
            # A store written before weights version 2 (no such key): compare under its own scheme.
            expected = memory_fingerprint(model, tokenizer, config, sink_prefix_ids(tokenizer, config.num_sink_tokens),
                                          weights_version=1)
            span_store = factory.open(path_or_url, expected, **dict(store_options or {}))
        try:
            return cls(span_store, model, tokenizer, config, **options)
        except BaseException:
            span_store.close()
            raise

    def close(self) -> None:
        """Stop the prefetch threads and close the store (idempotent)."""
        pool, self._prefetch_pool = self._prefetch_pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- documents
    def add_documents(self, texts: Sequence[str], metadatas: Sequence[Mapping[str, Any] | None] | None = None,
                      ids: Sequence[str] | None = None, *, collection: str = DEFAULT_COLLECTION,
                      progress: bool = True) -> list[str]:
        """Read each text through the model on its own (after the sink prefix) and store its spans, index vectors
        and K/V. Re-adding an id replaces that document.

        Every argument is checked, and every text tokenized, before the model runs or anything is written. Each
        document is then stored whole or not at all; if the call fails part-way (an interrupt, a full disk), the
        documents written before stay.

        Args:
            texts: Non-empty strings (valid Unicode).
            metadatas: One JSON-serialisable dict (or None) per text; :meth:`retrieve` filters on equality.
            ids: One unique id per text; ``None`` draws random ones.
            collection: Namespace of the documents.
            progress: Show a progress bar (tokens/s) over the documents.

        Returns:
            The documents' ids, in the order of ``texts``.

        Raises:
            TypeError / ValueError: bad input (naming the bad entry); nothing is written.
        """
        collection = check_collection(collection)
        prepared = prepare_input(texts, metadatas, ids)
        if not getattr(self.store, "writable", True):  # before the model reads anything
            raise StoreError("the store is open read-only (or closed): add_documents cannot write to it")
        encoded = [encode_document(self.tokenizer, text) for text in prepared.texts]
        for i, (doc_ids, _) in enumerate(encoded):
            if doc_ids.numel() == 0:
                raise ValueError(f"texts[{i}] (id {prepared.ids[i]!r}) encodes to no tokens: {prepared.texts[i]!r:.60}")
            if doc_ids.numel() > self.max_document_tokens:
                raise ValueError(f"texts[{i}] (id {prepared.ids[i]!r}) has {doc_ids.numel()} tokens, more than "
                                 f"max_document_tokens={self.max_document_tokens}; split it into smaller documents")
        total = sum(int(doc_ids.numel()) for doc_ids, _ in encoded)
        batch: list[DocumentRecord] = []
        held = 0
        # a full batch is written by a background thread while the model reads the next documents (at most one
        # write in flight, so at most two batches are held); leaving the block waits for it, also on an error,
        # so a failure part-way leaves every batch handed to the store written whole
        with tqdm(total=total, desc="ingest", unit="tok", unit_scale=True, disable=not progress) as bar, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="ltri-ingest-write") as writer:
            writing: Future[list[str]] | None = None
            for doc_id, metadata, (doc_ids, offsets) in zip(prepared.ids, prepared.metadatas, encoded):
                with self._lock:
                    record = ingest_document(self.model, self.config, self.sink_ids, doc_ids, offsets,
                                             doc_id=doc_id, collection=collection, metadata=metadata)
                batch.append(record)
                held += record_bytes(record)
                if held >= self.batch_bytes:
                    if writing is not None:
                        writing.result()  # the previous write's error, if any, surfaces here
                    writing = writer.submit(self.store.add, batch)
                    batch, held = [], 0
                bar.update(int(doc_ids.numel()))
            if writing is not None:
                writing.result()
            if batch:
                self.store.add(batch)
        return list(prepared.ids)

    def delete(self, ids: Sequence[str], *, collection: str = DEFAULT_COLLECTION) -> None:
        """Delete documents by id (their rows, index vectors and K/V files).

        Raises:
            DocumentNotFound: an id is not in ``collection`` (nothing is deleted then).
        """
        ids, collection = check_ids(ids), check_collection(collection)
        self.store.delete(ids, collection=collection)
        gone = set(ids)
        self.document_cache.forget(lambda key: key[0] == collection and key[1] in gone)

    def get(self, ids: Sequence[str], *, collection: str = DEFAULT_COLLECTION) -> list[DocumentInfo]:
        """The stored documents (text, metadata, token count), in the order of ``ids``.

        Raises:
            DocumentNotFound: an id is not in ``collection``.
        """
        return self.store.get(check_ids(ids), collection=check_collection(collection))

    def list_documents(self, collection: str | None = None) -> list[tuple[str, str]]:
        """Sorted ``(collection, doc_id)`` pairs, of one collection or (``None``) all."""
        return self.store.list_documents(collection)

    def collections(self) -> list[str]:
        """Names of the collections holding documents."""
        return self.store.collections()

    def stats(self) -> StoreStats:
        """Documents, spans, vectors, tokens and bytes on disk."""
        return self.store.stats()

    def verify(self) -> VerifyReport:
        """Check the store's metadata, indexes and K/V files against each other."""
        return self.store.verify()

    def repair(self) -> VerifyReport:
        """Fix what :meth:`verify` finds (what can be fixed); returns the report from before."""
        return self.store.repair()

    def _prepare_answer(self, query_or_messages: Prompt, *, k: int, collection: str | None,
                        filter: Mapping[str, Any] | None, chat_template: bool, max_memory_tokens: int | None
                        ) -> tuple[LtriSession, torch.Tensor, torch.Tensor, list[SpanHit], list[DocumentInfo]]:
        """Retrieve, import the chosen documents after the sink prefix, read the question: ``(session, logits of the
        last question token [vocab], question ids [Q], spans, documents)``."""
        if isinstance(query_or_messages, str):
            question = query_or_messages
            messages: Prompt = [{"role": "user", "content": question}]
        else:
            messages = query_or_messages
            users = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
            if not users or not isinstance(users[-1].get("content"), str):
                raise ValueError("messages must hold a user message with string content")
            question = users[-1]["content"]
        spans, docs, loaded = self._retrieve(self._question_ids(question), k, filter, collection, max_memory_tokens)
        if isinstance(query_or_messages, str) and not (chat_template and getattr(self.tokenizer, "chat_template",
                                                                                  None)):
            ids = self._question_ids(question)
        else:
            ids = encode_prompt(self.tokenizer, messages)
            bos = getattr(self.tokenizer, "bos_token_id", None)
            if ids.numel() > 1 and self.sink_ids.numel() and int(ids[0]) == bos:
                ids = ids[1:]  # the sink prefix already starts with it
        with self._lock:
            session = self._load_session(docs, record=False, loaded=loaded)[0]  # (files read once)
            logits = session.feed(ids)[0]
        return session, logits, ids, spans, docs

    def generate(self, query_or_messages: Prompt, max_new_tokens: int = 128, *, collection: str | None = None,
                 filter: Mapping[str, Any] | None = None, k: int = 4, chat_template: bool = True,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
                 max_memory_tokens: int | None = None) -> MemoryAnswer:
        """Answer from the stored documents with in-model KV retrieval.

        The question is first matched by :meth:`retrieve` (its hits are the answer's ``spans``). Then a fresh session
        reads the sink prefix, imports the span memory of the documents retrieve looked at (all candidates within
        ``max_memory_tokens``, else those the FAISS stage ranked first), reads the question and decodes; the engine
        retrieves from the imported spans at every step, as if it had read the documents itself.

        Args:
            query_or_messages: A question, or chat messages (``[{"role", "content"}]``).
            max_new_tokens: Most tokens to generate.
            collection: Documents of this collection; ``None``: of every collection.
            filter: Only documents whose metadata matches (equality).
            k: Spans to recall for citations (:meth:`retrieve`).
            chat_template: Wrap a string question in the tokenizer's chat template (when it has one); ``False`` reads
                it as plain text right after the documents. Messages always go through the template.
            temperature: 0 for greedy decoding, else the sampling temperature.
            top_p: Nucleus sampling mass.
            seed: Seed of the sampler.
            stop: Strings that end the answer (not included).
            max_memory_tokens: Overrides the memory's ``max_memory_tokens`` for this call.

        Returns:
            A :class:`MemoryAnswer` with the text and the recalled spans.
        """
        session, logits, ids, spans, docs = self._prepare_answer(
            query_or_messages, k=k, collection=collection, filter=filter, chat_template=chat_template,
            max_memory_tokens=max_memory_tokens)
        last: tuple[list[int], str, str | None] = ([], "", "length")
        for last in decode(self.model, self.tokenizer, session, logits, max_new_tokens=max_new_tokens, stop=stop,
                           temperature=temperature, top_p=top_p, seed=seed, lock=self._lock):
            if last[2] is not None:
                break
        return self._answer(last, spans, docs, session, ids)

    def _answer(self, last: tuple[list[int], str, str | None], spans: list[SpanHit], docs: list[DocumentInfo],
                session: LtriSession, ids: torch.Tensor) -> MemoryAnswer:
        return MemoryAnswer(text=last[1], token_ids=list(last[0]), spans=spans,
                            documents=[(d.collection, d.doc_id) for d in docs],
                            prompt_tokens=int(self.sink_ids.numel() + ids.numel()),
                            memory_tokens=sum(d.num_tokens for d in docs), finish_reason=last[2] or "length",
                            usage=session.usage())

    def stream(self, query_or_messages: Prompt, max_new_tokens: int = 128, *, collection: str | None = None,
               filter: Mapping[str, Any] | None = None, k: int = 4, chat_template: bool = True,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
               max_memory_tokens: int | None = None) -> MemoryStream:
        """Like :meth:`generate`, streaming: retrieval, import and the question run now; iterate the returned
        :class:`MemoryStream` for text pieces (incomplete characters and possible stop-string prefixes are held
        back); its ``spans`` are available at once, its ``result`` after the last piece."""
        session, logits, ids, spans, docs = self._prepare_answer(
            query_or_messages, k=k, collection=collection, filter=filter, chat_template=chat_template,
            max_memory_tokens=max_memory_tokens)
        steps = decode(self.model, self.tokenizer, session, logits, max_new_tokens=max_new_tokens, stop=stop,
                       temperature=temperature, top_p=top_p, seed=seed, lock=self._lock)

        def pieces() -> Iterator[str]:
            for piece, step in stream_pieces(steps, stop):
                if piece:
                    yield piece
                if step[2] is not None:
                    result.result = self._answer(step, spans, docs, session, ids)
                    return

        result = MemoryStream(pieces(), spans, [(d.collection, d.doc_id) for d in docs])
        return result

    # ------------------------------------------------------------------------------------------- async
    async def aadd_documents(self, texts: Sequence[str], metadatas: Sequence[Mapping[str, Any] | None] | None = None,
                             ids: Sequence[str] | None = None, *, collection: str = DEFAULT_COLLECTION,
                             progress: bool = False) -> list[str]:
        """:meth:`add_documents` run in a worker thread (``asyncio.to_thread``): the event loop stays free, the
        model still runs one call at a time."""
        return await asyncio.to_thread(self.add_documents, texts, metadatas, ids, collection=collection,
                                       progress=progress)

    async def aretrieve(self, query: str, k: int = 4, *, filter: Mapping[str, Any] | None = None,
                        collection: str | None = None) -> list[SpanHit]:
        """:meth:`retrieve` run in a worker thread (``asyncio.to_thread``)."""
        return await asyncio.to_thread(self.retrieve, query, k, filter=filter, collection=collection)

    async def agenerate(self, query_or_messages: Prompt, max_new_tokens: int = 128, **kwargs: Any) -> MemoryAnswer:
        """:meth:`generate` run in a worker thread (``asyncio.to_thread``); same keyword arguments."""
        return await asyncio.to_thread(self.generate, query_or_messages, max_new_tokens, **kwargs)
