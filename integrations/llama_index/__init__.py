"""LlamaIndex adapters: :class:`LtriLLM` (:mod:`.llm`); :class:`LtriRetriever`, :class:`LtriQueryEngine`,
:func:`text_rag_query_engine` and :class:`LtriMemoryBlock` (:mod:`.retrieval`).

    from ltri_rag.integrations.llama_index import LtriLLM, LtriRetriever, LtriQueryEngine, LtriMemoryBlock
"""

from ltri_rag.integrations.llama_index.llm import LtriLLM, chat_template_prompt
from ltri_rag.integrations.llama_index.retrieval import (
    LtriMemoryBlock,
    LtriQueryEngine,
    LtriRetriever,
    filters_to_memory_filter,
    spans_to_nodes,
    text_rag_query_engine,
)

__all__ = ["LtriLLM", "LtriMemoryBlock", "LtriQueryEngine", "LtriRetriever", "chat_template_prompt",
           "filters_to_memory_filter", "spans_to_nodes", "text_rag_query_engine"]
