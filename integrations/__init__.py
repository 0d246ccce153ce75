"""LangChain, LlamaIndex and LangGraph adapters (installed as ``ltri_rag.integrations``).

LangChain: :mod:`ltri_rag.integrations.langchain`; LlamaIndex: :mod:`ltri_rag.integrations.llama_index`; LangGraph
(the ``langgraph`` extra): :mod:`ltri_rag.integrations.langgraph`. Import the submodule you need (each imports its
framework).
"""
