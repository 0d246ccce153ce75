"""Text in, text out: ``generate`` and ``stream_generate`` over prompts of any length."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from ltri_rag.config import LtriConfig
from ltri_rag.engine import LtriSession

__all__ = ["GenerationResult", "encode_prompt", "eos_token_ids", "generate", "stream_generate", "generate_ids"]

Messages = Sequence[dict[str, Any]]
Prompt = Union[str, Messages]


@dataclass
class GenerationResult:
    """What :func:`generate_ids` returns.

    Attributes:
        token_ids: Generated token ids (stop tokens excluded).
        text: Decoded text (stop strings cut off).
        prompt_tokens: Tokens read before decoding.
        finish_reason: ``stop`` (end-of-sequence token or stop string) or ``length``.
        usage: Engine accounting from :meth:`LtriSession.usage` at the end.
    """

    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)


def encode_prompt(tokenizer: Any, prompt: Prompt) -> torch.Tensor:
    """Token ids ``[seq_len]`` of a string, or of chat messages through the tokenizer's chat template.

    Raises:
        TypeError: for anything but a string or a sequence of ``{"role", "content"}`` dicts.
        ValueError: for an empty prompt.
    """
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    elif isinstance(prompt, Sequence) and all(isinstance(m, dict) and "role" in m and "content" in m
                                               for m in prompt):
        if len(prompt) == 0:
            raise ValueError("messages are empty")
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        raise TypeError("prompt must be a str or a list of {'role', 'content'} messages, "
                        f"got {type(prompt).__name__}")
    return torch.tensor(ids, dtype=torch.int64)


def eos_token_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Token ids that end generation: the model's generation config and the tokenizer's eos token."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _check_args(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _stream_ids(
    model: nn.Module, tokenizer: Any, prompt: Prompt | torch.Tensor, config: LtriConfig, *, max_new_tokens: int,
    stop: Sequence[str], temperature: float, top_p: float, seed: int | None, progress: bool,
) -> Iterator[tuple[list[int], str, str | None, LtriSession, int]]:
    """Yield ``(ids so far, text so far, finish reason or None, session, prompt tokens)`` after each token."""
    _check_args(max_new_tokens, temperature, top_p)
    ids = prompt if isinstance(prompt, torch.Tensor) else encode_prompt(tokenizer, prompt)
    session = LtriSession(model, config, progress=progress)
    logits = session.feed(ids)[0]
    eos = eos_token_ids(model, tokenizer)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        token = _pick(logits, temperature, top_p, generator)
        if token in eos:
            yield out, text, "stop", session, ids.numel()
            return
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        if cut >= 0:
            yield out, text[:cut], "stop", session, ids.numel()
            return
        yield out, text, None, session, ids.numel()
        if len(out) < max_new_tokens:
            logits = session.step(torch.tensor([token]))[0]
    yield out, text, "length", session, ids.numel()


def generate_ids(
    model: nn.Module, tokenizer: Any, prompt: Prompt | torch.Tensor, config: LtriConfig | None = None, *,
    max_new_tokens: int = 64, stop: Sequence[str] = (), temperature: float = 0.0, top_p: float = 1.0,
    seed: int | None = None, progress: bool = False,
) -> GenerationResult:
    """Read ``prompt`` (text, chat messages or token ids ``[seq_len]``) as a stream and generate a continuation.

    Args:
        model: Hugging Face causal LM.
        tokenizer: Its tokenizer.
        prompt: A string, chat messages (``[{"role": ..., "content": ...}]``, chat template applied), or ids.
        config: Engine configuration; default ``LtriConfig()`` (mode ``ltri``).
        max_new_tokens: Most tokens to generate.
        stop: Strings that end generation (not included in the text).
        temperature: 0 for greedy decoding, else sampling temperature.
        top_p: Nucleus sampling mass.
        seed: Seed of the sampler.
        progress: Show a progress bar while reading the prompt.

    Returns:
        A :class:`GenerationResult`.
    """
    last = None
    for last in _stream_ids(model, tokenizer, prompt, config or LtriConfig(), max_new_tokens=max_new_tokens,
                            stop=stop, temperature=temperature, top_p=top_p, seed=seed, progress=progress):
        if last[2] is not None:
            break
    assert last is not None
    out, text, reason, session, n_prompt = last
    return GenerationResult(token_ids=out, text=text, prompt_tokens=n_prompt, finish_reason=reason or "length",
                            usage=session.usage())


def generate(model: nn.Module, tokenizer: Any, prompt: Prompt | torch.Tensor, config: LtriConfig | None = None,
             **kwargs: Any) -> str:
    """Like :func:`generate_ids` but returns only the generated text."""
    return generate_ids(model, tokenizer, prompt, config, **kwargs).text


def stream_generate(
    model: nn.Module, tokenizer: Any, prompt: Prompt | torch.Tensor, config: LtriConfig | None = None, *,
    max_new_tokens: int = 64, stop: Sequence[str] = (), temperature: float = 0.0, top_p: float = 1.0,
    seed: int | None = None, progress: bool = False,
) -> Iterator[str]:
    """Like :func:`generate`, yielding text pieces as they are decoded (incomplete UTF-8 is held back)."""
    emitted = 0
    hold = 0
    for _, text, reason, _, _ in _stream_ids(model, tokenizer, prompt, config or LtriConfig(),
                                             max_new_tokens=max_new_tokens, stop=stop, temperature=temperature,
                                             top_p=top_p, seed=seed, progress=progress):
        # hold back a trailing replacement char (a partial multi-byte character) and any possible stop prefix
        hold = max((len(s) - 1 for s in stop if s), default=0) if reason is None else 0
        safe = len(text.rstrip("\ufffd")) if reason is None else len(text)
        upto = max(emitted, safe - hold)
        if upto > emitted:
            yield text[emitted:upto]
            emitted = upto
        if reason is not None:
            return
