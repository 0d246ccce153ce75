"""Time per decoded token on the CPU (the plain-torch path): reusing the placed memory part against building it at
every step, beside Hugging Face's own decode, on real text.

    LTRI_DATA_DIR=DATA python -m benchmarks.bench_cpu_decode --model MODELS/qwen2.5-coder-0.5b.gguf \
        --lengths 8192 16384 --out benchmarks/results/cpu_decode

For each length: a prompt of Paul Graham essays cut to leave room for a question, then the question. One ltri session
(the defaults) reads it and decodes ``--tokens`` greedy tokens in segments of ``--segment``, alternating
``REUSE_PLACED_MEMORY`` on and off between segments (the same process, the same session: the flag changes no value,
so both halves continue one generation), each step timed on its own. A second session with the flag off throughout
decodes the same number of tokens: its tokens must equal the first's (``same_tokens``). Hugging Face's forward with a
``DynamicCache`` (full attention, the model's own SDPA path) reads the same prompt and decodes as many tokens; its
row says on how many leading tokens the two greedy decodes agree, and both texts are printed. A session that decodes
one token id throughout stops the run (a broken greedy loop: session 36's first version fed token 0 at every step).
``--flag module:NAME`` alternates another exact switch instead (any module-level boolean).
Prints a table (median and mean ms per token, prefill seconds, the share of layer-steps that reused their memory
part) and writes ``bench.json`` and ``bench.md``.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.output import save_rows
from benchmarks.tasks import data_dir
from ltri_rag import LtriConfig, LtriSession
from ltri_rag.layer import GlobalLayerState
from ltri_rag.loading import load_model

QUESTION = "\n\nQuestion: What does the author say about how startups should choose what to work on? Answer:"


def prompt_ids(tokenizer: Any, length: int) -> torch.Tensor:
    """``[1, length]`` ids: essays (sorted by file name, :func:`benchmarks.tasks.data_dir`) cut to leave room for the
    question, then the question."""
    folder = data_dir() / "paul_graham_essays"
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt")))
    question = tokenizer(QUESTION, return_tensors="pt").input_ids
    body = tokenizer(text, return_tensors="pt").input_ids[:, : length - question.shape[1]]
    if body.shape[1] + question.shape[1] < length:
        raise ValueError(f"the essays hold {body.shape[1]} tokens, fewer than --length {length} needs")
    return torch.cat([body, question], dim=1)


def _reuses(session: LtriSession) -> int:
    return sum(s.placed_reuses for s in session.cache.states if isinstance(s, GlobalLayerState))


DEFAULT_FLAG = "ltri_rag.layer_memory:REUSE_PLACED_MEMORY"


def _flag(spec: str) -> tuple[Any, str]:
    """``(module, name)`` of a boolean switch named ``module:NAME`` (``ValueError`` naming a bad one)."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--flag {spec!r}: no module {module_name!r}") from exc
    if not isinstance(getattr(module, name, None), bool):
        raise ValueError(f"--flag {spec!r}: {module_name}.{name} is not a boolean switch")
    return module, name


def ltri_decode(model: Any, ids: torch.Tensor, tokens: int, segment: int | None,
                flag: str = DEFAULT_FLAG) -> dict[str, Any]:
    """Prefill and greedy decode; ``segment``: alternate ``flag`` (``module:NAME``) every ``segment`` steps, on
    first (None: off throughout). The switch is put back as it was afterwards."""
    module, name = _flag(flag)
    initial = getattr(module, name)
    session = LtriSession(model, LtriConfig())
    start = time.perf_counter()
    logits = session.feed(ids)
    prefill = time.perf_counter() - start
    times: dict[bool, list[float]] = {True: [], False: []}
    reused: dict[bool, int] = {True: 0, False: 0}
    out = []
    try:
        for i in range(tokens):
            reuse = segment is not None and (i // segment) % 2 == 0
            setattr(module, name, reuse)
            token = logits.argmax(-1)  # step() and feed() return [batch, vocab]
            out.append(int(token))
            before = _reuses(session)
            start = time.perf_counter()
            logits = session.step(token)
            times[reuse].append(time.perf_counter() - start)
            reused[reuse] += _reuses(session) - before
    finally:
        setattr(module, name, initial)
    layers = sum(isinstance(s, GlobalLayerState) for s in session.cache.states)
    return {"prefill_s": prefill, "times": times, "reused": reused, "layers": layers, "tokens": out}


def hf_decode(model: Any, ids: torch.Tensor, tokens: int) -> dict[str, Any]:
    """Hugging Face's own prefill and greedy decode (full attention, ``DynamicCache``)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    start = time.perf_counter()
    out = model(ids, past_key_values=cache, use_cache=True)
    prefill = time.perf_counter() - start
    times, toks = [], []
    for _ in range(tokens):
        token = out.logits[:, -1:].argmax(-1)
        toks.append(int(token))
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - start)
    return {"prefill_s": prefill, "times": times, "tokens": toks}


def _prefix(a: list[int], b: list[int]) -> int:
    """Leading tokens on which two greedy decodes agree."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _row(length: int, mode: str, prefill: float, times: list[float], **extra: Any) -> dict[str, Any]:
    return {"length": length, "mode": mode, "prefill_s": round(prefill, 2), "steps": len(times),
            "ms_median": round(1000 * statistics.median(times), 1), "ms_mean": round(1000 * statistics.fmean(times), 1),
            **extra}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a .gguf file or a model folder")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens per session")
    parser.add_argument("--segment", type=int, default=8, help="steps per segment of the alternating session")
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face's decode")
    parser.add_argument("--flag", default=DEFAULT_FLAG,
                        help="the exact switch the sessions alternate, as module:NAME (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.tokens < 2 * args.segment or args.segment < 1:
        parser.error(f"--tokens ({args.tokens}) must cover two --segment ({args.segment}) segments")
    try:
        _flag(args.flag)
    except ValueError as exc:
        parser.error(str(exc))
    name = args.flag.partition(":")[2]
    labels = ((True, "ltri, placed memory reused"), (False, "ltri, built every step")) if args.flag == DEFAULT_FLAG \
        else ((True, f"ltri, {name} on"), (False, f"ltri, {name} off"))
    model, tokenizer = load_model(args.model, device="cpu")
    rows = []
    with torch.no_grad():
        for length in args.lengths:
            ids = prompt_ids(tokenizer, length)
            mixed = ltri_decode(model, ids, args.tokens, args.segment, args.flag)
            plain = ltri_decode(model, ids, args.tokens, None, args.flag)
            same = mixed["tokens"] == plain["tokens"]
            for reuse, mode in labels:
                steps = len(mixed["times"][reuse])
                share = mixed["reused"][reuse] / (steps * mixed["layers"])
                rows.append(_row(length, mode, mixed["prefill_s"], mixed["times"][reuse],
                                 reused_share=round(share, 3), same_tokens=same))
            rows.append(_row(length, f"{labels[1][1]} (own session)", plain["prefill_s"],
                             plain["times"][False], reused_share=0.0, same_tokens=same))
            distinct = len(set(mixed["tokens"]))
            if distinct < 2:
                raise RuntimeError(f"the session decoded one token id only ({mixed['tokens'][:8]}...): "
                                   "a broken greedy loop, not a measurement")
            if not args.no_hf:
                hf = hf_decode(model, ids, args.tokens)
                agree = _prefix(mixed["tokens"], hf["tokens"])
                rows.append(_row(length, "Hugging Face, full attention", hf["prefill_s"], hf["times"],
                                 ltri_prefix_agrees=agree))
                print(f"{length}: ltri {tokenizer.decode(mixed['tokens'])!r}\n{length}: HF   "
                      f"{tokenizer.decode(hf['tokens'])!r}", flush=True)
            for row in rows[-4:]:
                print(row, flush=True)
    lines = ["| length | mode | prefill s | steps | ms / token (median) | mean | layer-steps reused | same tokens "
             "| leading tokens equal to ltri's |", "|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['length']} | {r['mode']} | {r['prefill_s']} | {r['steps']} | {r['ms_median']} | "
                     f"{r['ms_mean']} | {r.get('reused_share', '-')} | {r.get('same_tokens', '-')} | "
                     f"{r.get('ltri_prefix_agrees', '-')} |")
    meta = {"model": Path(args.model).name, "tokens": args.tokens, "segment": args.segment, "flag": args.flag,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(model.dtype)}
    save_rows(args.out, meta, rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
