"""Text in, text out: ``generate`` and ``stream_generate`` over prompts of any length."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ContextManager, Union

import torch
from torch import nn

from ltri_rag.config import LtriConfig
from ltri_rag.engine import LtriSession

__all__ = ["GenerationResult", "decoded_tokens", "encode_prompt", "encode_text", "eos_token_ids", "generate",
           "stream_generate", "generate_ids"]

# Whether greedy decoding runs one step ahead (:func:`decoded_tokens`) when a caller does not say: None = on CUDA.
DECODE_AHEAD: bool | None = None

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


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of prompt text, with the tokenizer's special tokens (its BOS, for a tokenizer that adds one) unless
    the text already starts with the BOS token (text a chat template formatted), so that it is never doubled. Every
    adapter encodes its prompt text here, so the same text reads the same ids through any of them."""
    bos = getattr(tokenizer, "bos_token", None)
    special = not (isinstance(bos, str) and bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_prompt(tokenizer: Any, prompt: Prompt) -> torch.Tensor:
    """Token ids ``[seq_len]`` of a string (:func:`encode_text`), or of chat messages through the tokenizer's chat
    template (its text as the template wrote it, no special token added, as ``apply_chat_template`` does); for a
    tokenizer without a template, ``"role: content"`` lines ending in ``"assistant: "``, encoded as a string.

    Raises:
        TypeError: for anything but a string or a sequence of ``{"role", "content"}`` dicts.
        ValueError: for an empty prompt.
    """
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        ids = encode_text(tokenizer, prompt)
    elif isinstance(prompt, Sequence) and all(isinstance(m, dict) and "role" in m and "content" in m
                                               for m in prompt):
        if len(prompt) == 0:
            raise ValueError("messages are empty")
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = encode_text(tokenizer, "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: ")
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


def decoded_tokens(session: LtriSession, logits: torch.Tensor, max_tokens: int, *, temperature: float = 0.0,
                   top_p: float = 1.0, generator: torch.Generator | None = None,
                   lock: ContextManager[Any] | None = None, ahead: bool | None = None) -> Iterator[int]:
    """The tokens a one-sequence session decodes from ``logits``, one at a time; the session reads each of them
    (one :meth:`LtriSession.step`) before the next is chosen.

    Greedy decoding (``temperature`` 0) can run one step ahead (``ahead``; None: when the session is on CUDA): the
    step that reads token ``i`` is queued on the device, from the token the device chose, before token ``i`` is
    copied to the host and yielded. The host's work for a step (the engine's bookkeeping, launching its kernels or
    graph) then overlaps the device's work on the step before, and the caller's work on a token (detokenizing,
    checking stop strings) overlaps the next step. The tokens are the same as one step at a time; the difference:
    a caller that stops at token ``i`` (an end-of-sequence token, a stop string) leaves the session having read
    token ``i`` too, which a step-at-a-time loop reads only when asked for token ``i + 1``. Sampling runs one step
    at a time.

    Args:
        session: A session of batch size 1 that has read a prompt.
        logits: ``[vocab]`` next-token logits of the last token read.
        max_tokens: Most tokens yielded; the last one is never read by the session.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: Nucleus sampling mass.
        generator: Seeded generator of the sampler.
        lock: Held around each model call (several threads sharing one model).
        ahead: Run greedy decoding one step ahead (see above); None: :data:`DECODE_AHEAD`, whose None means on
            CUDA.

    Yields:
        Token ids.
    """
    guard = lock if lock is not None else contextlib.nullcontext()
    if ahead is None:
        ahead = DECODE_AHEAD if DECODE_AHEAD is not None else logits.device.type == "cuda"
    if temperature > 0 or not ahead:
        for i in range(max_tokens):
            token = _pick(logits, temperature, top_p, generator)
            yield token
            if i + 1 < max_tokens:
                with guard:
                    logits = session.step(torch.tensor([token]))[0]
        return
    cuda = logits.device.type == "cuda"
    host = torch.empty(1, dtype=torch.int64, pin_memory=cuda)  # where the device writes each token for the host
    copied = torch.cuda.Event() if cuda else None
    token_dev = logits.argmax().reshape(1)
    for i in range(max_tokens):
        host.copy_(token_dev, non_blocking=cuda)
        if copied is not None:
            copied.record(torch.cuda.current_stream(logits.device))  # the stream the copy was queued on
        if i + 1 < max_tokens:  # the step reading this token, queued behind the copy
            with guard:
                logits = session.step(token_dev)[0]
            next_dev = logits.argmax().reshape(1)
        if copied is not None:
            copied.synchronize()  # the token only, not the step queued after it
        yield int(host[0])
        if i + 1 < max_tokens:
            token_dev = next_dev


def texts_of(tokens: Iterator[int], tokenizer: Any, eos: set[int], stop: Sequence[str]
             ) -> Iterator[tuple[list[int], str, str | None]]:
    """``(ids so far, text so far, finish reason or None)`` after each of ``tokens``, ending with a finish reason:
    ``stop`` at an end-of-sequence token (not included) or at a stop string (the text cut before it), ``length``
    when ``tokens`` runs out. Stops drawing from ``tokens`` once finished."""
    out: list[int] = []
    text = ""
    for token in tokens:
        if token in eos:
            yield out, text, "stop"
            return
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        if cut >= 0:
            yield out, text[:cut], "stop"
            return
        yield out, text, None
    yield out, text, "length"


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
    tokens = decoded_tokens(session, logits, max_new_tokens, temperature=temperature, top_p=top_p,
                            generator=generator)
    for out, text, reason in texts_of(tokens, tokenizer, eos, stop):
        yield out, text, reason, session, ids.numel()


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

    On CUDA, greedy decoding runs one step ahead (:func:`decoded_tokens`): the same tokens, the host's work on a
    step overlapping the device's on the one before.
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
