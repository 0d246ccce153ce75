"""ltri-rag: streaming long-context inference with in-model KV retrieval (Ltri-LLM) on Hugging Face models.

Quick use::

    model, tokenizer = ltri_rag.load_model("Qwen/Qwen2.5-0.5B-Instruct")
    text = ltri_rag.generate(model, tokenizer, very_long_prompt, ltri_rag.LtriConfig(mode="ltri"))
"""

from ltri_rag import hook as _hook  # registers the "ltri" attention function with transformers
from ltri_rag.cache import LtriCache
from ltri_rag.config import LtriConfig
from ltri_rag.engine import LtriSession
from ltri_rag.generation import GenerationResult, encode_prompt, generate, generate_ids, stream_generate
from ltri_rag.loading import load_model
from ltri_rag.memory import KVMemory, MemoryAnswer, MemoryStream

__all__ = [
    "GenerationResult",
    "KVMemory",
    "LtriCache",
    "LtriConfig",
    "LtriSession",
    "MemoryAnswer",
    "MemoryStream",
    "encode_prompt",
    "generate",
    "generate_ids",
    "load_model",
    "stream_generate",
]
__version__ = "0.1.0"
