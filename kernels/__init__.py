"""Attention and scoring kernels (installed as ``ltri_rag.kernels``).

Each function validates its inputs and runs a plain-torch reference path; Triton backends plug in behind the
same signatures. Only torch (and triton) are imported here.
"""

from ltri_rag.kernels.attention import LocalAttention, attention_with_lse, local_attention, merge_attention
from ltri_rag.kernels.scoring import span_probabilities, span_scores

__all__ = ["LocalAttention", "attention_with_lse", "local_attention", "merge_attention", "span_probabilities",
           "span_scores"]
