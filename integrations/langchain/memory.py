"""LangChain retrieval and chat memory over a :class:`~ltri_rag.memory.KVMemory`: the retriever (span hits as
``Document``s, add/delete by id) and a chat message history whose turns go into the memory. The chat model and the
LLM are in :mod:`ltri_rag.integrations.langchain.chat`."""

from __future__ import annotations

import asyncio
import threading
import uuid
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core._api import LangChainBetaWarning
from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.documents import Document
from langchain_core.indexing.base import DeleteResponse, DocumentIndex, UpsertResponse
from langchain_core.messages import (
    BaseMessage,
    message_to_dict,
    messages_from_dict,
)
from pydantic import ConfigDict

from ltri_rag.memory import DEFAULT_COLLECTION, KVMemory


class LtriRetriever(DocumentIndex):
    """The spans a :class:`KVMemory` recalls for a query, as LangChain ``Document`` s, with add / upsert / get /
    delete by id (LangChain's ``DocumentIndex`` shape).

    Each hit is ``Document(id="<collection>/<doc_id>:<start_char>-<end_char>", page_content=<span text>,
    metadata={**the document's metadata, "doc_id", "collection", "start_char", "end_char", "score"})``, best first:
    the id names one passage, unique across collections (the LlamaIndex retriever's node ids are the same strings);
    ``get`` / ``delete`` take the document's own id, ``metadata["doc_id"]``.

    ``k``, ``filter`` and ``collection`` are fields and per-call keyword arguments (``invoke(q, k=3)``). Searches
    cover ``collection`` (``None``: every collection); writes go to ``collection`` or ``"default"``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    memory: KVMemory
    k: int = 4
    collection: str | None = None
    filter: dict[str, Any] | None = None
    max_memory_tokens: int | None = None

    def __init__(self, **data: Any) -> None:
        with warnings.catch_warnings():  # DocumentIndex is marked beta in langchain-core
            warnings.simplefilter("ignore", LangChainBetaWarning)
            super().__init__(**data)
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")

    def _write_collection(self, collection: str | None) -> str:
        return collection or self.collection or DEFAULT_COLLECTION

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None, filter: Mapping[str, Any] | None = None,
                                collection: str | None = None, **kwargs: Any) -> list[Document]:
        if kwargs:
            raise TypeError(f"LtriRetriever got unsupported keyword arguments {sorted(kwargs)}; supported: "
                            "k, filter, collection")
        hits = self.memory.retrieve(query, self.k if k is None else k, filter=self.filter if filter is None else filter,
                                    collection=self.collection if collection is None else collection,
                                    max_memory_tokens=self.max_memory_tokens)
        metas: dict[tuple[str, str], dict[str, Any]] = {}
        docs = []
        for hit in hits:
            key = (hit.collection, hit.doc_id)
            if key not in metas:
                metas[key] = self.memory.get([hit.doc_id], collection=hit.collection)[0].metadata
            meta = {**metas[key], "doc_id": hit.doc_id, "collection": hit.collection, "start_char": hit.char_start,
                    "end_char": hit.char_end, "score": hit.score}
            docs.append(Document(id=f"{hit.collection}/{hit.doc_id}:{hit.char_start}-{hit.char_end}",
                                 page_content=hit.text, metadata=meta))
        return docs

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       **kwargs: Any) -> list[Document]:
        """:meth:`_get_relevant_documents` in a worker thread (the model runs one call at a time)."""
        return await asyncio.to_thread(self._get_relevant_documents, query,
                                       run_manager=run_manager.get_sync(), **kwargs)

    def add_documents(self, documents: Sequence[Document], ids: Sequence[str] | None = None, *,
                      collection: str | None = None) -> list[str]:
        """Ingest ``documents`` (text, metadata) into the memory; ids from ``ids``, else each ``Document.id``, else
        random. Re-adding an id replaces that document. Returns the ids."""
        if isinstance(documents, Document) or not isinstance(documents, Sequence):
            raise TypeError(f"documents must be a list of Document, got {type(documents).__name__}")
        for i, doc in enumerate(documents):
            if not isinstance(doc, Document):
                raise TypeError(f"documents[{i}] must be a Document, got {type(doc).__name__}")
        if ids is None:
            ids = [doc.id or uuid.uuid4().hex for doc in documents]
        return self.memory.add_documents([d.page_content for d in documents], [d.metadata for d in documents],
                                         list(ids), collection=self._write_collection(collection), progress=False)

    def upsert(self, items: Sequence[Document], /, **kwargs: Any) -> UpsertResponse:
        """Add or replace ``items`` by ``Document.id`` (``collection=`` keyword optional)."""
        ids = self.add_documents(items, collection=kwargs.pop("collection", None), **kwargs)
        return UpsertResponse(succeeded=ids, failed=[])

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> DeleteResponse:
        """Delete documents by id (``collection=`` keyword optional).

        Raises:
            ValueError: no ids.
            DocumentNotFound: an id is not stored (nothing is deleted then).
        """
        if not ids:
            raise ValueError("delete needs a non-empty list of document ids")
        collection = self._write_collection(kwargs.pop("collection", None))
        if kwargs:
            raise TypeError(f"delete got unsupported keyword arguments {sorted(kwargs)}")
        self.memory.delete(ids, collection=collection)
        return DeleteResponse(num_deleted=len(ids), succeeded=list(ids), failed=[], num_failed=0)

    def get(self, ids: Sequence[str], /, **kwargs: Any) -> list[Document]:
        """The whole stored documents with these ids (missing ids are skipped), ``Document.id`` = doc id."""
        collection = self._write_collection(kwargs.pop("collection", None))
        if kwargs:
            raise TypeError(f"get got unsupported keyword arguments {sorted(kwargs)}")
        stored = {doc_id for _, doc_id in self.memory.list_documents(collection)}
        present = list(dict.fromkeys(i for i in ids if i in stored))  # once each, in the order asked
        if not present:
            return []
        return [Document(id=info.doc_id, page_content=info.text,
                         metadata={**info.metadata, "doc_id": info.doc_id, "collection": info.collection})
                for info in self.memory.get(present, collection=collection)]

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """``VectorStore``-style alias of :meth:`get`."""
        return self.get(ids)


# ------------------------------------------------------------------------------------------------ chat history
_HISTORY_LOCKS: weakref.WeakKeyDictionary[KVMemory, dict[str, threading.Lock]] = weakref.WeakKeyDictionary()
_HISTORY_GUARD = threading.Lock()


def _history_lock(memory: KVMemory, collection: str) -> threading.Lock:
    """One lock per (memory object, collection): two exchanges added at once must not take the same turn number."""
    with _HISTORY_GUARD:
        return _HISTORY_LOCKS.setdefault(memory, {}).setdefault(collection, threading.Lock())


class KVChatMessageHistory(BaseChatMessageHistory):
    """Chat history kept in a :class:`KVMemory`, so old turns are recalled by in-model retrieval.

    Each :meth:`add_messages` call is ingested as one document of the collection ``collection_prefix +
    session_id`` (id ``turn-<n>``, ``n`` counting up): the text is one ``"<type>: <content>"`` line per message, the
    metadata holds ``session_id``, ``index`` (= ``n``), the messages themselves and each message's character range
    (``turns``). An exchange added in one call (a user message and its reply, as ``RunnableWithMessageHistory``
    does) is read by the model together, as one document: every document costs a few passes of the model over the
    sink prefix and its text (about 1 s for a short one on a CPU), so fewer, larger calls ingest faster.

    Example::

        history = KVChatMessageHistory(memory, session_id="user-1")
        history.add_messages([HumanMessage("My locker code is 4711."), AIMessage("Noted.")])
        history.recall("locker code")                                   # Documents of the matching spans
        ChatLtri(memory=memory, collection=history.collection).invoke("What is my locker code?")
    """

    def __init__(self, memory: KVMemory, session_id: str, *, collection_prefix: str = "chat:") -> None:
        if not isinstance(memory, KVMemory):
            raise TypeError(f"memory must be a KVMemory, got {type(memory).__name__}")
        if not isinstance(session_id, str) or not session_id.strip():
            raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
        if not isinstance(collection_prefix, str):
            raise TypeError(f"collection_prefix must be a str, got {type(collection_prefix).__name__}")
        self.memory, self.session_id = memory, session_id
        self.collection = f"{collection_prefix}{session_id}"

    def _ids(self) -> list[str]:
        return [doc_id for _, doc_id in self.memory.list_documents(self.collection)]

    @staticmethod
    def _number(doc_id: str) -> int:
        """``n`` of a ``turn-<n>`` id (``msg-<n>``: one message per document, as earlier versions stored them)."""
        prefix, _, number = doc_id.partition("-")
        return int(number) if prefix in ("turn", "msg") and number.isdigit() else -1

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The session's messages in the order they were added."""
        ids = self._ids()
        if not ids:
            return []
        infos = sorted(self.memory.get(ids, collection=self.collection), key=lambda d: d.metadata["index"])
        stored = [m for d in infos for m in d.metadata.get("messages", [d.metadata.get("message")]) if m]
        return messages_from_dict(stored)

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Ingest ``messages`` (read through the model once, together, as one document) after the existing ones."""
        messages = list(messages)
        for i, message in enumerate(messages):
            if not isinstance(message, BaseMessage):
                raise TypeError(f"messages[{i}] must be a BaseMessage, got {type(message).__name__}")
        if not messages:
            return
        with _history_lock(self.memory, self.collection):  # the next number and its write, one exchange at a time
            self._add(messages)

    def _add(self, messages: list[BaseMessage]) -> None:
        n = max((self._number(doc_id) for doc_id in self._ids()), default=-1) + 1
        lines, turns, at = [], [], 0
        for message in messages:
            content = message.content if isinstance(message.content, str) else message.text
            line = f"{message.type}: {content.strip() or '(empty)'}\n"
            turns.append([at, at + len(line) - 1])
            lines.append(line)
            at += len(line)
        metadata = {"session_id": self.session_id, "index": n, "roles": [m.type for m in messages],
                    "messages": [message_to_dict(m) for m in messages], "turns": turns}
        self.memory.add_documents(["".join(lines)], [metadata], [f"turn-{n:08d}"], collection=self.collection,
                                  progress=False)

    def clear(self) -> None:
        """Delete the session's messages from the memory."""
        ids = self._ids()
        if ids:
            self.memory.delete(ids, collection=self.collection)

    def recall(self, query: str, k: int = 4) -> list[Document]:
        """The turns' spans the model attends to for ``query`` (as :class:`LtriRetriever` returns them)."""
        return self.as_retriever(k=k).invoke(query)

    def as_retriever(self, **kwargs: Any) -> LtriRetriever:
        """An :class:`LtriRetriever` over this session's collection."""
        return LtriRetriever(memory=self.memory, collection=self.collection, **kwargs)
