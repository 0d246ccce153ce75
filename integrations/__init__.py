"""LangChain and LlamaIndex adapters (installed as ``ltri_rag.integrations``).

Empty in this release: the adapters are tracked as their own issue. Use :func:`ltri_rag.generate` meanwhile.
"""
