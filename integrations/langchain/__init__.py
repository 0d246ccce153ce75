"""LangChain adapters: :class:`ChatLtri` and :class:`LtriLLM` (:mod:`.chat`), :class:`LtriRetriever` and
:class:`KVChatMessageHistory` (:mod:`.memory`).

    from ltri_rag.integrations.langchain import ChatLtri, LtriLLM, LtriRetriever, KVChatMessageHistory
"""

from ltri_rag.integrations.langchain.chat import ChatLtri, LtriLLM, span_metadata
from ltri_rag.integrations.langchain.memory import KVChatMessageHistory, LtriRetriever

__all__ = ["ChatLtri", "KVChatMessageHistory", "LtriLLM", "LtriRetriever", "span_metadata"]
