"""Long-context quality grid: models x tasks x lengths x systems, every sample written to JSONL.

Systems are the engine's modes (``full``, ``streaming``, ``infllm``, ``ltri``), ltri ablations, and text-chunk RAG
(the same model answering from the top chunks of a standard splitter + all-MiniLM-L6-v2 + FAISS). The run resumes:
rows already in ``samples.jsonl`` are skipped, so a grid larger than one GPU call is finished by calling again.

Example (the lent GPU, several calls until done)::

    python -m benchmarks.evaluate --model qwen=/tmp/m/qwen.gguf --model gemma=/tmp/m/gemma.gguf \\
        --tasks niah_single niah_multikey vt qa_squad --lengths 4096 8192 16384 32768 --samples 20 \\
        --out benchmarks/results/quality_h200 --max-seconds 560
    python -m benchmarks.report benchmarks/results/quality_h200

Seeds: split ``dev`` uses seeds 0.., ``test`` 100000.. (defaults are tuned on dev, reported on test).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import ltri_rag
from benchmarks.long_tasks import ALL_TASKS, TASKS, TaskSample, make_sample, max_new_tokens, score
from benchmarks.measure import file_sha256, run_prompt
from ltri_rag import LtriConfig

SPLIT_SEEDS = {"dev": 0, "test": 100_000}


@dataclass(frozen=True)
class System:
    """One column of the grid.

    Attributes:
        name: Column name.
        mode: Engine mode (``rag`` systems answer in ``full`` mode from retrieved chunks).
        overrides: LtriConfig fields changed from the run's base settings.
        rag_tokens: For RAG: ``budget`` (the retrieval budget) or ``working_set`` (sinks + budget + window).
    """

    name: str
    mode: str
    overrides: dict[str, Any] = field(default_factory=dict)
    rag_tokens: str | None = None


SYSTEMS: dict[str, System] = {s.name: s for s in [
    System("full", "full"),
    System("streaming", "streaming"),
    System("infllm", "infllm"),
    System("ltri", "ltri"),
    System("rag", "full", rag_tokens="budget"),
    System("rag_ws", "full", rag_tokens="working_set"),
    # ablations of ltri, one knob at a time
    System("ltri_static_iv", "ltri", {"index_vectors": "static"}),
    System("ltri_no_consensus", "ltri", {"consensus_weight": 0.0, "lookahead": False}),
    System("ltri_no_persistence", "ltri", {"persistence": False}),
    System("ltri_head_voting", "ltri", {"voting": True}),
    System("ltri_pos_fixed", "ltri", {"position_scheme": "fixed"}),
    System("ltri_pos_absolute", "ltri", {"position_scheme": "absolute"}),
    System("ltri_span_32", "ltri", {"span_max_len": 32}),
    System("ltri_span_128", "ltri", {"span_max_len": 128}),
    System("ltri_dot_scoring", "ltri", {"span_scoring": "dot"}),
]}
DEFAULT_SYSTEMS = ("full", "streaming", "infllm", "ltri", "rag")


def parse_system(text: str) -> System:
    """A system by name, or ``NAME=JSON`` with ``{"mode": ..., other LtriConfig fields}`` for a new one."""
    if "=" not in text:
        if text not in SYSTEMS:
            raise argparse.ArgumentTypeError(f"unknown system {text!r}; known: {', '.join(SYSTEMS)} "
                                             "(or NAME={json overrides})")
        return SYSTEMS[text]
    name, spec = text.split("=", 1)
    try:
        fields = json.loads(spec)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"system {name!r}: bad JSON {spec!r} ({err})") from err
    if not isinstance(fields, dict):
        raise argparse.ArgumentTypeError(f"system {name!r}: expected a JSON object, got {spec!r}")
    mode = fields.pop("mode", "ltri")
    rag = fields.pop("rag_tokens", None)
    return System(name, mode, fields, rag)


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings every system shares (window, budget, chunk, sinks; full attention's pieces and the attention
    backend when set)."""
    config = dict(local_window=args.window, budget=args.budget, chunk_size=args.chunk, num_sink_tokens=args.sinks)
    if getattr(args, "full_chunk", None):
        config["full_chunk_size"] = args.full_chunk
    if getattr(args, "backend", None):
        config["attention_backend"] = args.backend
    return config


def system_config(system: System, args: argparse.Namespace) -> LtriConfig:
    """The LtriConfig a system runs with (validated: a bad override fails before any model runs)."""
    return LtriConfig(mode=system.mode, **{**base_config(args), **system.overrides})  # type: ignore[arg-type]


def prompt_text(tokenizer: Any, sample: TaskSample, context: str, prompt_format: str) -> tuple[str, bool]:
    """The prompt as text and whether it went through the chat template (then its special tokens are in the text
    and the tokenizer must not add more). See :func:`format_prompt`."""
    if prompt_format not in ("raw", "chat", "auto"):
        raise ValueError(f"prompt_format must be 'raw', 'chat' or 'auto', got {prompt_format!r}")
    template = getattr(tokenizer, "chat_template", None)
    if prompt_format == "raw" or (prompt_format == "auto" and not template):
        return sample.render(context), False
    if not template:
        raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template")
    user = sample.instruction + context + sample.question
    text = tokenizer.apply_chat_template([{"role": "user", "content": user.strip()}], tokenize=False,
                                         add_generation_prompt=True)
    return text + sample.answer_prefix.lstrip(), True


def format_prompt(tokenizer: Any, sample: TaskSample, context: str, prompt_format: str) -> str | torch.Tensor:
    """The sample around ``context`` as raw text, or (``chat``) as token ids of a user turn through the tokenizer's
    chat template with the answer prefix opening the assistant turn (as RULER prompts instruct models).
    ``auto`` is ``chat`` when the tokenizer has a chat template."""
    text, chat = prompt_text(tokenizer, sample, context, prompt_format)
    if not chat:
        return text
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


class Runner:
    """Runs systems on samples of one model, with a lazily built text-RAG retriever.

    Args:
        model, tokenizer: The loaded model.
        args: Parsed command line (window, budget, chunk, sinks, rag chunking).
        rag_factory: Builds the RAG retriever from the tokenizer (tests inject a fake embedder here).
    """

    def __init__(self, model: Any, tokenizer: Any, args: argparse.Namespace,
                 rag_factory: Callable[[Any], Any] | None = None) -> None:
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self._rag_factory = rag_factory
        self._rag: Any = None

    def rag(self) -> Any:
        if self._rag is None:
            if self._rag_factory is not None:
                self._rag = self._rag_factory(self.tokenizer)
            else:
                from benchmarks.rag import TextRAG
                self._rag = TextRAG(self.tokenizer, chunk_tokens=self.args.rag_chunk_tokens,
                                    overlap_tokens=self.args.rag_overlap_tokens)
        return self._rag

    def run(self, system: System, sample: TaskSample) -> dict[str, Any]:
        """One (system, sample) cell: the answer, its score and its costs."""
        config = system_config(system, self.args)
        context, extra = sample.context, {}
        if system.rag_tokens is not None:
            args = self.args
            budget = args.budget if system.rag_tokens == "budget" else args.budget + args.window + args.sinks
            rag = self.rag()  # built (its embedding model loaded) outside the timed retrieval
            began = time.perf_counter()
            chunks = rag.retrieve(sample.context, sample.query or sample.question, budget)
            context = rag.build_context(chunks)
            extra = {"rag_s": time.perf_counter() - began, "rag_chunks": len(chunks),
                     "rag_tokens": sum(c.num_tokens for c in chunks)}
        prompt = format_prompt(self.tokenizer, sample, context, self.args.prompt_format)
        result = run_prompt(self.model, self.tokenizer, prompt, config, max_new_tokens(sample.task))
        return {**result, **extra, "score": score(result["prediction"], sample)}


def sample_plan(samples: int, split: str) -> list[tuple[int, float, int]]:
    """``(index, depth, seed)`` of each sample: depths spread over 5-95%, seeds from the split."""
    base = SPLIT_SEEDS[split]
    return [(i, round(0.05 + 0.9 * i / max(samples - 1, 1), 3), base + i) for i in range(samples)]


def sample_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """A row's cell: ``(model, system, task, length, seed, depth)`` (see :func:`load_done` for why the depth)."""
    return row["model"], row["system"], row["task"], row["length"], row["seed"], row.get("depth")


def load_done(path: Path) -> set[tuple[Any, ...]]:
    """Keys of the rows already in ``samples.jsonl`` (a truncated last line is ignored): model, system, task,
    length, seed and depth. The depth belongs to the key because :func:`sample_plan` spreads depths over the sample
    count: a folder run with another ``--samples`` holds the same seed at another depth, i.e. another prompt."""
    done: set[tuple[Any, ...]] = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done.add(sample_key(row))
    return done


def record_error(out: Path, model: str, system: str, task: str, length: int, seed: int, err: BaseException) -> None:
    """Append a failed cell to ``errors.jsonl`` and say so; the cell gets no row, so the next run retries it."""
    line = {"model": model, "system": system, "task": task, "length": length, "seed": seed,
            "error": f"{type(err).__name__}: {err}"[:2000], "traceback": traceback.format_exc()[-4000:]}
    fd = os.open(out / "errors.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode("utf-8"))
    finally:
        os.close(fd)
    print(f"FAILED {model} {task} {length} seed={seed} {system}: {line['error'][:300]}", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Options every grid command shares: engine sizes, RAG chunking, device, time budget, output."""
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--sinks", type=int, default=128)
    parser.add_argument("--full-chunk", type=int, default=None, metavar="TOKENS",
                        help="full attention reads longer prompts in pieces of TOKENS through transformers' cache "
                             "(exact; bounds the attention-mask memory, e.g. Gemma 3's sliding mask at 128K)")
    parser.add_argument("--backend", choices=("torch", "triton", "auto"), default=None,
                        help="kernels of the engine's local attention (LtriConfig.attention_backend)")
    parser.add_argument("--tf32", action="store_true",
                        help="let the engine's float32 matmuls (the torch attention path, span scoring) use TF32 "
                             "tensor cores on CUDA: faster, ~1e-3 relative error in the scores; recorded in "
                             "meta.json")
    parser.add_argument("--rag-chunk-tokens", type=int, default=256)
    parser.add_argument("--rag-overlap-tokens", type=int, default=32)
    parser.add_argument("--prompt-format", choices=("auto", "raw", "chat"), default="auto",
                        help="chat: through the tokenizer's chat template (auto: when it has one)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-seconds", type=float, default=float("inf"), help="stop cleanly after this long")
    parser.add_argument("--order", choices=("sample", "length"), default="sample",
                        help="sample: sample 0 at every length and task, then sample 1, ... (a run cut short still "
                             "covers every cell); length: all samples of the shortest length first")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                        help="run only every N-th sample (those with position %% N == I) so N processes share a grid "
                             "(see benchmarks/parallel.py)")
    parser.add_argument("--max-failures", type=int, default=20,
                        help="cells that may fail (logged to errors.jsonl, retried on the next run) before the "
                             "run stops")
    parser.add_argument("--out", type=Path, required=True)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` as ``(I, N)`` with ``0 <= I < N``."""
    index, sep, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = (-1, 0)
    if not sep or not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return shard


def grid_groups(args: argparse.Namespace) -> list[tuple[int, str, tuple[int, float, int]]]:
    """This shard's ``(length, task, (index, depth, seed))`` samples in run order (see ``--order``)."""
    plan = sample_plan(args.samples, args.split)
    order = getattr(args, "order", "sample")
    if order == "sample":
        groups = [(length, task, item) for item in plan for length in args.lengths for task in args.tasks]
    elif order == "length":
        groups = [(length, task, item) for length in args.lengths for task in args.tasks for item in plan]
    else:
        raise ValueError(f"order must be 'sample' or 'length', got {order!r}")
    index, count = getattr(args, "shard", (0, 1))
    return groups[index::count]


def parse_models(parser: argparse.ArgumentParser, specs: list[str]) -> list[tuple[str, str]]:
    """``NAME=PATH`` specs as pairs (a malformed one is a usage error naming it)."""
    models = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--model must be NAME=PATH, got {spec!r}")
        models.append((name, path))
    return models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="model to evaluate (Hub id, directory or .gguf); repeat for several")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=ALL_TASKS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--systems", nargs="+", type=parse_system,
                        default=[SYSTEMS[s] for s in DEFAULT_SYSTEMS])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--split", choices=tuple(SPLIT_SEEDS), default="test")
    add_run_args(parser)
    args = parser.parse_args(argv)
    models = parse_models(parser, args.model)
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    for system in args.systems:  # fail on a bad override now, not after an hour
        try:
            system_config(system, args)
        except (TypeError, ValueError) as err:
            parser.error(f"system {system.name!r}: {err}")
    run_grid(models, args)


def run_grid(models: list[tuple[str, str]], args: argparse.Namespace,
             loader: Callable[[str], tuple[Any, Any]] | None = None,
             rag_factory: Callable[[Any], Any] | None = None) -> list[dict[str, Any]]:
    """Run every missing cell of the grid; append rows to ``args.out / samples.jsonl``; return the new rows."""
    began = time.perf_counter()
    if getattr(args, "tf32", False):
        torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "samples.jsonl"
    done = load_done(rows_path)
    new_rows: list[dict[str, Any]] = []
    groups = grid_groups(args)
    shard = getattr(args, "shard", (0, 1))
    meta_path = args.out / "meta.json"
    for name, path in models:
        todo = [(length, task, item, system) for length, task, item in groups
                for system in args.systems if (name, system.name, task, length, item[2], item[1]) not in done]
        if not todo:
            continue
        if time.perf_counter() - began > args.max_seconds:
            break
        model, tokenizer = (loader or (lambda p: ltri_rag.load_model(p, dtype=args.dtype, device=args.device)))(path)
        device = next(model.parameters()).device
        run_meta = {"model": name, "path": path, "sha256": file_sha256(path),
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                    "base_config": base_config(args), "split": args.split, "prompt_format": args.prompt_format,
                    "systems": {s.name: {"mode": s.mode, **s.overrides, "rag_tokens": s.rag_tokens}
                                for s in args.systems},
                    "shards": shard[1], "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                    "tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
        if shard[0] == 0:  # one record per run, not one per worker
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"runs": []}
            meta["runs"].append(run_meta)
            meta_path.write_text(json.dumps(meta, indent=2))
        runner = Runner(model, tokenizer, args, rag_factory)
        current: tuple[Any, ...] | None = None
        sample: TaskSample | None = None
        # one os.write per row on an O_APPEND descriptor: rows of workers sharing the file never interleave
        sink = os.open(rows_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        failures = 0
        try:
            for length, task, (index, depth, seed), system in todo:
                if time.perf_counter() - began > args.max_seconds:
                    print(f"time budget reached; {len(new_rows)} new rows; call again to resume", flush=True)
                    return new_rows
                if current != (task, length, seed):
                    sample = make_sample(task, tokenizer, length, depth, seed)
                    current = (task, length, seed)
                try:
                    result = runner.run(system, sample)
                except Exception as err:  # one bad cell must not end a worker's whole shard
                    failures += 1
                    record_error(args.out, name, system.name, task, length, seed, err)
                    if failures > getattr(args, "max_failures", 20):
                        raise
                    continue
                row = {"model": name, "system": system.name, "task": task, "length": length, "depth": depth,
                       "seed": seed, "index": index, "split": args.split, "answers": list(sample.answers),
                       "tokens": sample.num_tokens, **result}
                os.write(sink, (json.dumps(row) + "\n").encode("utf-8"))
                new_rows.append(row)
                print(f"{name} {task:<16} {length:>7} d={depth:.2f} {system.name:<18} score={row['score']:.2f} "
                      f"prefill={row['prefill_s']:.2f}s pred={row['prediction'][:40]!r}", flush=True)
        finally:
            os.close(sink)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return new_rows


if __name__ == "__main__":
    main()
