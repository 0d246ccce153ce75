"""Why a needle answer was right or wrong: which needles each layer retrieved, and how the spans cut them.

    python -m benchmarks.trace_retrieval --model qwen=qwen.gguf --task niah_multikey --length 16384 \\
        --seed 100001 --depth 0.097 [--system ltri] [--out trace.json]

Rebuilds the sample, answers it greedily with one engine mode, and records, for every global layer, the tokens it
retrieved from the span memory (a) for the question (the prompt's last chunk, after any look-ahead) and (b) for the
first answer token. For every needle planted in the haystack (the asked one and the distractors) it reports the
fraction of the needle's *value* tokens each layer retrieved, in how many layers the value came with its key
(``+ key``; a number without its key cannot be told from the distractors), in how many layers a span boundary
separates key from value, and the spans around the value; and, for every answer token, in how many layers the value
was fully retrieved when that token was predicted (a number copied only in part shows where it dropped out). A
needle still inside the local window needs no retrieval and is marked so.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import ltri_rag
from benchmarks.evaluate import SYSTEMS, parse_system, prompt_text, system_config
from benchmarks.long_tasks import TASKS, make_sample, max_new_tokens
from benchmarks.misses import NEEDLE
from ltri_rag import LtriSession
from ltri_rag.generation import eos_token_ids
from ltri_rag.layer import GlobalLayerState


def needle_tokens(tokenizer: Any, text: str, add_special: bool, context: str) -> tuple[torch.Tensor, list[dict]]:
    """Token ids of ``text`` and each planted needle's key and value token range ``[start, end)``."""
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    base = text.find(context)
    if base < 0:
        raise ValueError("the context is not verbatim in the prompt text")
    needles = []
    def token_range(lo: int, hi: int) -> list[int]:
        toks = [i for i, (a, b) in enumerate(offsets) if a < base + hi and b > base + lo and b > a]
        return [min(toks), max(toks) + 1]

    for m in NEEDLE.finditer(context):
        needles.append({"key": m.group(1), "value": m.group(2), "tokens": token_range(m.start(2), m.end(2)),
                        "key_tokens": token_range(m.start(1), m.end(1))})
    return torch.tensor(enc["input_ids"], dtype=torch.int64), needles


def require_records(log: list[dict], config: Any) -> None:
    """Raise when a prompt pass recorded no retrieval: :func:`recording` sees the torch path's selections only (a
    CUDA run with the Triton backend selects on the device and replays captured decode steps)."""
    if not log:
        raise RuntimeError("no retrieval was recorded: the trace sees the torch path only (attention_backend="
                           f"{config.attention_backend!r}); run on a CPU or with attention_backend='torch' and "
                           "decode_graph=False")


@contextmanager
def recording(log: list[dict]):
    """Record every global layer's retrieved token positions (``slot + sinks``) per call of ``_slot_lists`` (the
    torch path; see :func:`require_records`)."""
    original = GlobalLayerState._slot_lists

    def traced(self: GlobalLayerState, q: torch.Tensor, plan: Any, scaling: float, position: Any = None):
        slot_lists, on_device = original(self, q, plan, scaling, position)
        slots = slot_lists[0]
        positions = None if slots is None else [
            (row[row >= 0] + self.cfg.num_sink_tokens).tolist() for row in slots]
        log.append({"layer": self.layer_idx, "q_len": plan.q_len, "dry": plan.dry, "positions": positions})
        return slot_lists, on_device

    GlobalLayerState._slot_lists = traced
    try:
        yield
    finally:
        GlobalLayerState._slot_lists = original


def coverage(positions: list[list[int]] | None, span: list[int]) -> float:
    """Largest fraction, over KV heads, of the token range ``span`` found in ``positions``."""
    if not positions:
        return 0.0
    want = set(range(*span))
    return max(len(want & set(p)) / len(want) for p in positions)


def span_cuts(state: GlobalLayerState, span: list[int]) -> list[list[int]]:
    """The layer's memory spans (token positions ``[start, end)``) that overlap ``span``."""
    if not state.tables:
        return []
    table, sinks = state.tables[0], state.cfg.num_sink_tokens
    out = []
    for a, b in zip(table.starts.tolist(), table.ends.tolist()):
        if a + sinks < span[1] and b + sinks > span[0]:
            out.append([a + sinks, b + sinks])
    return out


def trace(model: Any, tokenizer: Any, sample: Any, system: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Answer ``sample`` and return the per-layer retrieval of each needle (see the module docstring)."""
    text, chat = prompt_text(tokenizer, sample, sample.context, args.prompt_format)
    ids, needles = needle_tokens(tokenizer, text, not chat, sample.context)
    config = system_config(system, args)
    session = LtriSession(model, config)
    log: list[dict] = []
    first: list[dict] = []
    num_global = sum(isinstance(s, GlobalLayerState) for s in session.cache.states)
    with recording(log):
        logits = session.feed(ids)
        require_records(log, config)
        question = [e for e in log if not e["dry"]][-num_global:]  # the prompt's last chunk, every layer
        log.clear()
        eos = eos_token_ids(model, tokenizer)
        out: list[int] = []
        steps: list[list[dict]] = []  # steps[i]: retrieval while reading answer token i (to predict token i + 1)
        for _ in range(max_new_tokens(sample.task)):
            token = int(logits[0].argmax())
            if token in eos:
                break
            out.append(token)
            logits = session.step(torch.tensor([token]))
            steps.append(list(log))
            log.clear()
        first = steps[0] if steps else []
    states = session.cache.states
    window_start = min((s.win_start for s in states if isinstance(s, GlobalLayerState)), default=0)
    layers = sorted({e["layer"] for e in question} | {e["layer"] for e in first})
    rows = []
    for n in needles:
        asked = n["value"] in sample.answers
        in_window = n["tokens"][0] >= window_start
        per_layer = {}
        for layer in layers:
            q = next((e for e in question if e["layer"] == layer), None)
            f = next((e for e in first if e["layer"] == layer), None)
            per_layer[layer] = {"question": coverage(q and q["positions"], n["tokens"]),
                                "first_token": coverage(f and f["positions"], n["tokens"]),
                                "key_first_token": coverage(f and f["positions"], n["key_tokens"]),
                                "spans": span_cuts(states[layer], n["tokens"])}
        full_q = sum(v["question"] == 1.0 for v in per_layer.values())
        full_f = sum(v["first_token"] == 1.0 for v in per_layer.values())
        with_key = sum(v["first_token"] == 1.0 and v["key_first_token"] == 1.0 for v in per_layer.values())
        split = sum(any(a > n["key_tokens"][0] for a, _ in v["spans"]) for v in per_layer.values())
        # per answer token: layers whose retrieval held the whole value when that token was predicted
        by_step = [full_q] + [sum(coverage(e["positions"], n["tokens"]) == 1.0 for e in step) for step in steps]
        rows.append({**n, "asked": asked, "in_window": in_window, "layers_full_question": full_q,
                     "layers_full_first_token": full_f, "layers_value_with_key": with_key,
                     "layers_key_cut_from_value": split, "layers_full_by_answer_token": by_step[:len(out)],
                     "per_layer": per_layer})
    prediction = tokenizer.decode(out, skip_special_tokens=True)
    return {"task": sample.task, "length": sample.num_tokens, "seed": sample.seed, "depth": sample.depth,
            "system": system.name, "answers": list(sample.answers), "prediction": prediction,
            "answer_tokens": [tokenizer.decode([t]) for t in out], "num_global_layers": len(layers),
            "needles": rows}


def render(result: dict[str, Any]) -> str:
    """A few lines: the prediction and, per needle, in how many layers its value was fully retrieved."""
    head = (f"{result['task']} {result['length']} tokens seed={result['seed']} depth={result['depth']} "
            f"{result['system']}: answers {result['answers']}, said {result['prediction']!r}")
    columns = (f"{'needle':>28} {'asked':>5} {'window':>6} {'layers (question)':>18} {'layers (1st token)':>19}"
               f" {'+ key':>7} {'key cut off':>11}  spans cutting the value (layer 0..2)")
    lines = [head, columns]
    total = result["num_global_layers"]
    for n in result["needles"]:
        cuts = [v["spans"] for _, v in sorted(n["per_layer"].items())[:3]]
        lines.append(f"{n['key'] + '=' + n['value']:>28} {'yes' if n['asked'] else '':>5} "
                     f"{'yes' if n['in_window'] else '':>6} {n['layers_full_question']:>12}/{total:<5} "
                     f"{n['layers_full_first_token']:>13}/{total:<5} {n['layers_value_with_key']:>7} "
                     f"{n['layers_key_cut_from_value']:>11}  {cuts}")
    asked = [n for n in result["needles"] if n["asked"]]
    if asked and result.get("answer_tokens"):
        pairs = zip(result["answer_tokens"], asked[0]["layers_full_by_answer_token"])
        lines.append("asked value fully retrieved, layers per answer token: "
                     + " ".join(f"{tok!r}:{count}" for tok, count in pairs))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="NAME=PATH")
    parser.add_argument("--task", default="niah_multikey", choices=[t for t in TASKS if t.startswith("niah")])
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--depth", type=float, required=True)
    parser.add_argument("--system", type=parse_system, default=SYSTEMS["ltri"])
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--sinks", type=int, default=128)
    parser.add_argument("--prompt-format", choices=("auto", "raw", "chat"), default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None, help="append the trace as one JSON line here")
    args = parser.parse_args(argv)
    if args.system.mode not in ("ltri", "infllm"):
        parser.error(f"--system must retrieve (an ltri or infllm system), got mode {args.system.mode!r}")
    _, _, path = args.model.partition("=")
    model, tokenizer = ltri_rag.load_model(path, dtype=args.dtype, device=args.device)
    sample = make_sample(args.task, tokenizer, args.length, args.depth, args.seed)
    result = trace(model, tokenizer, sample, args.system, args)
    print(render(result), flush=True)
    if args.out is not None:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
