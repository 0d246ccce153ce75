"""Tiny random Hugging Face causal LMs (seeded) of the families the engine supports."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 256
FAMILIES = ("llama", "qwen2", "mistral", "gemma3")


def tiny_model(family: str, num_kv_heads: int = 2, num_heads: int = 4, seed: int = 0,
               sliding_window: int | None = None) -> nn.Module:
    """A 2-layer random model of ``family`` in float32, eval mode, SDPA attention."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, max_position_embeddings=4096,
                  attn_implementation="sdpa")
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=sliding_window))
    elif family == "gemma3":
        cfg = Gemma3TextConfig(**common, head_dim=16, sliding_window=sliding_window or 8,
                               layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(f"unknown family {family!r}")
    # random init is small; scale attention projections so attention maps are peaked and differences visible
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model.eval()


def reference_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[batch, seq_len, vocab]`` logits of the unmodified model in one pass."""
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def reference_greedy(model: nn.Module, input_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[batch, num_tokens]`` greedy continuation, recomputing the whole sequence each step (no cache)."""
    ids = input_ids
    with torch.no_grad():
        for _ in range(num_tokens):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[:, input_ids.shape[1]:]


def greedy_logits(session, input_ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The logits of ``session.feed(input_ids)``, then of ``steps`` greedy decode steps (each feeding the argmax of
    the logits before it)."""
    logits = [session.feed(input_ids)]
    for _ in range(steps):
        logits.append(session.step(logits[-1].argmax(-1)))
    return logits


def exact_config(mode: str, chunk_size: int, **overrides: object) -> "LtriConfig":
    """Every evicted span retrieved at its true position (so the engine must be exact), with a tiny window."""
    from ltri_rag import LtriConfig

    base = dict(mode=mode, num_sink_tokens=3, local_window=16, chunk_size=chunk_size, budget=100_000, page_size=5,
                evict_stride=4, block_size=8, span_min_len=2, span_max_len=12, position_scheme="absolute")
    base.update(overrides)
    return LtriConfig(**base)  # type: ignore[arg-type]


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """``[batch, length]`` seeded random token ids."""
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
