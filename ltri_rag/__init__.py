"""ltri-rag: streaming long-context inference with in-model KV retrieval (Ltri-LLM) on Hugging Face models."""

from ltri_rag import hook as _hook  # registers the "ltri" attention function with transformers
from ltri_rag.cache import LtriCache
from ltri_rag.config import LtriConfig
from ltri_rag.engine import LtriSession

__all__ = ["LtriCache", "LtriConfig", "LtriSession"]
__version__ = "0.1.0"
