"""LangChain and LlamaIndex adapters (installed as ``ltri_rag.integrations``).

LangChain: :mod:`ltri_rag.integrations.langchain`; LlamaIndex: :mod:`ltri_rag.integrations.llama_index`. Import
the submodule you need (each imports its framework).
"""
