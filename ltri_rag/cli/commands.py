"""The ``ltri-rag`` commands: ``ingest``, ``ask``, ``chat``, ``ls``, ``rm``, ``stats``, ``verify``.

Each takes the parsed arguments and an :class:`~ltri_rag.cli.runtime.Output` and returns the exit code. Commands that
only read or delete (``ls``, ``rm``, ``stats``, ``verify``) open the store without loading a model.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ltri_rag.cli.documents import collect_documents
from ltri_rag.cli.runtime import (
    CliError,
    Output,
    fingerprint_summary,
    open_raw_store,
    read_note,
    store_path,
    stored_config,
)
from ltri_rag.cli.session import OpenedMemory, open_memory

__all__ = ["answer_question", "cmd_ask", "cmd_chat", "cmd_ingest", "cmd_ls", "cmd_rm", "cmd_stats", "cmd_verify",
           "span_dict"]

SNIPPET_CHARS = 160


# ------------------------------------------------------------------------------------------------- helpers
def span_dict(hit: Any) -> dict[str, Any]:
    """A recalled span (:class:`~ltri_rag.store.SpanHit`) as JSON-ready citation data."""
    return {"doc_id": hit.doc_id, "collection": hit.collection, "char_start": hit.char_start,
            "char_end": hit.char_end, "token_start": hit.token_start, "token_end": hit.token_end,
            "score": round(float(hit.score), 4), "text": hit.text}


def _snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def print_citations(out: Output, spans: Sequence[Any], *, indent: str = "  ") -> None:
    """The cited spans, one block each: rank, document, character and token offsets, score, text."""
    if not spans:
        out.text(f"{indent}(no spans recalled)")
        return
    for rank, hit in enumerate(spans, 1):
        where = f"[{hit.collection}] " if hit.collection != "default" else ""
        out.text(f"{indent}[{rank}] {where}{hit.doc_id}  chars {hit.char_start}-{hit.char_end}  tokens "
                 f"{hit.token_start}-{hit.token_end}  score {hit.score:.3f}")
        out.text(f"{indent}    \"{_snippet(hit.text)}\"")


def answer_question(opened: OpenedMemory, out: Output, question: Any, *, max_new_tokens: int, k: int,
                    collection: str | None, filter: dict[str, Any] | None, temperature: float,
                    seed: int | None, echo: bool = True) -> dict[str, Any]:
    """Answer ``question`` (a string or chat messages) from the memory, streaming the text to stdout when ``echo``
    and not ``--json``; returns the answer, its spans and timings as a dict."""
    memory = opened.memory
    start = time.perf_counter()
    stream = memory.stream(question, max_new_tokens, k=k, collection=collection, filter=filter,
                           temperature=temperature, seed=seed)
    first = time.perf_counter()
    pieces: list[str] = []
    for piece in stream:
        pieces.append(piece)
        if echo:
            out.text(piece, end="")
    end = time.perf_counter()
    result = stream.result
    text = result.text if result is not None else "".join(pieces)
    if echo and not text.endswith("\n"):
        out.text("")
    generated = len(result.token_ids) if result is not None else 0
    return {
        "answer": text.strip(),
        "spans": [span_dict(h) for h in stream.spans],
        "hits": list(stream.spans),
        "finish_reason": result.finish_reason if result is not None else None,
        "prompt_tokens": result.prompt_tokens if result is not None else None,
        "memory_tokens": result.memory_tokens if result is not None else None,
        "generated_tokens": generated,
        "retrieve_s": round(first - start, 3),
        "answer_s": round(end - first, 3),
    }


def _public(result: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in result.items() if key != "hits"}


def _timing_line(result: dict[str, Any]) -> str:
    rate = result["generated_tokens"] / result["answer_s"] if result["answer_s"] > 0 else 0.0
    return (f"retrieve + read {result['retrieve_s']:.1f} s, answer {result['generated_tokens']} tokens in "
            f"{result['answer_s']:.1f} s ({rate:.1f} tok/s), {result['memory_tokens'] or 0:,} tokens served from "
            "memory")


# ------------------------------------------------------------------------------------------------- ingest
def _discard_new_store(opened: OpenedMemory) -> None:
    """Remove a store this command created (it held nothing before the failure)."""
    opened.memory.close()
    shutil.rmtree(opened.path, ignore_errors=True)


def cmd_ingest(args: argparse.Namespace, out: Output) -> int:
    """Read files into the store; every file is read and checked first, then the model runs and the store is
    written. Unchanged documents (same id and text) are skipped; changed ones are replaced."""
    docs = collect_documents(args.paths)
    opened = open_memory(args, out, create=True)
    memory = opened.memory
    try:
        existing = {doc_id for _, doc_id in memory.list_documents(args.collection)}
        known = {info.doc_id: info.text for info in memory.get(sorted(existing & {d.doc_id for d in docs}),
                                                               collection=args.collection)} if existing else {}
        todo = [d for d in docs if known.get(d.doc_id) != d.text]
        skipped = [d.doc_id for d in docs if known.get(d.doc_id) == d.text]
        start = time.perf_counter()
        if todo:
            out.status(f"ingesting {len(todo)} documents into {opened.path}")
            try:
                memory.add_documents([d.text for d in todo], [{"source": str(d.path)} for d in todo],
                                     [d.doc_id for d in todo], collection=args.collection, progress=out.progress)
            except (TypeError, ValueError) as err:  # checked before anything is written
                if opened.created:
                    _discard_new_store(opened)
                raise CliError(f"nothing was ingested: {err}") from None
        seconds = time.perf_counter() - start
        infos = memory.get([d.doc_id for d in todo], collection=args.collection) if todo else []
        tokens = sum(info.num_tokens for info in infos)
        result = {
            "store": str(opened.path), "model": opened.loaded.name, "collection": args.collection,
            "added": [d.doc_id for d in todo if d.doc_id not in known],
            "replaced": [d.doc_id for d in todo if d.doc_id in known],
            "skipped": skipped, "tokens": tokens, "ingest_s": round(seconds, 3),
            "load_model_s": round(opened.loaded.seconds, 3),
        }
        out.json(result)
        rate = f" ({tokens / seconds:,.0f} tok/s)" if seconds > 0 and tokens else ""
        out.text(f"ingested {len(result['added'])} new, {len(result['replaced'])} replaced, {len(skipped)} unchanged "
                 f"document(s): {tokens:,} tokens in {seconds:.1f} s{rate} -> {opened.path}")
        return 0
    finally:
        memory.close()


# ------------------------------------------------------------------------------------------------- ask
def cmd_ask(args: argparse.Namespace, out: Output) -> int:
    """Answer a question from the store, streaming the answer, then list the cited spans."""
    question = args.question.strip()
    if not question:
        raise CliError("the question is empty")
    opened = open_memory(args, out, read_only=True)
    try:
        if opened.memory.stats().documents == 0:
            raise CliError(f"the store at {str(opened.path)!r} holds no documents; ingest some first")
        if not opened.memory.matching_documents(args.collection, dict(args.filter) if args.filter else None):
            where = " and ".join(part for part in (
                f"the collection {args.collection!r}" if args.collection is not None else "",
                f"the filter {dict(args.filter)}" if args.filter else "") if part)
            raise CliError(f"{where} select(s) no documents (collections: "
                           f"{', '.join(repr(c) for c in opened.memory.collections()) or 'none'})")
        result = answer_question(opened, out, question, max_new_tokens=args.max_new_tokens, k=args.k,
                                 collection=args.collection, filter=dict(args.filter) if args.filter else None,
                                 temperature=args.temperature,
                                 seed=args.seed)
    finally:
        opened.memory.close()
    result = {"question": question, **_public(result), "load_model_s": round(opened.loaded.seconds, 3)}
    out.json(result)
    out.text("\nSources:")
    print_citations(out, [_Hit(s) for s in result["spans"]])
    out.text(f"({_timing_line(result)})")
    return 0


class _Hit:
    """A citation dict seen as a :class:`~ltri_rag.store.SpanHit` (attribute access) for printing."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.__dict__.update(data)


# ------------------------------------------------------------------------------------------------- chat
CHAT_HELP = "type a question; /sources shows the last answer's spans, /exit (or Ctrl-D) ends the chat"


def _read_lines(prompt: str, interactive: bool) -> Iterable[str]:
    while True:
        try:
            line = input(prompt) if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and line == "":
            return
        yield line.rstrip("\n")


def cmd_chat(args: argparse.Namespace, out: Output) -> int:
    """A REPL over the store: each question is answered from the memory (documents and earlier turns), and each turn
    (question + answer) is ingested into the collection ``chat:<session>`` so later turns can recall it."""
    opened = open_memory(args, out)
    memory = opened.memory
    session = args.session or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    collection = f"chat:{session}"
    # after the highest stored turn (a count would reuse a number once any turn was removed, overwriting a later one)
    turn = 1 + max((int(doc_id[5:]) for _, doc_id in memory.list_documents(collection)
                    if doc_id.startswith("turn-") and doc_id[5:].isdigit()), default=-1)
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty() and not out.json_mode
    if interactive:
        out.text(f"ltri-rag chat (session {session}, store {opened.path}); {CHAT_HELP}")
    last: list[Any] = []
    try:
        for line in _read_lines("you> ", interactive):
            question = line.strip()
            if not question:
                continue
            if question in ("/exit", "/quit"):
                break
            if question == "/help":
                out.text(CHAT_HELP)
                continue
            if question == "/sources":
                print_citations(out, last)
                continue
            messages = history[-2 * args.history:] + [{"role": "user", "content": question}] if args.history else \
                question
            if interactive:
                out.text("ltri> ", end="")
            result = answer_question(opened, out, messages, max_new_tokens=args.max_new_tokens, k=args.k,
                                     collection=None, filter=None, temperature=args.temperature, seed=args.seed,
                                     echo=not out.json_mode)
            last = result.pop("hits")
            memory.add_documents([f"User: {question}\nAssistant: {result['answer']}"],
                                 [{"session": session, "turn": turn, "question": question}],
                                 [f"turn-{turn:05d}"], collection=collection, progress=False)
            history += [{"role": "user", "content": question}, {"role": "assistant", "content": result["answer"]}]
            if out.json_mode:
                out.stdout.write(json.dumps({"turn": turn, "session": session, "question": question, **result},
                                            ensure_ascii=False) + "\n")
                out.stdout.flush()
            elif last:
                top = last[0]
                out.text(f"      [from {top.doc_id} chars {top.char_start}-{top.char_end}, score {top.score:.2f}; "
                         "/sources for all]")
            turn += 1
    finally:
        memory.close()
    return 0


# ------------------------------------------------------------------------------------------------- ls / rm
def cmd_ls(args: argparse.Namespace, out: Output) -> int:
    """List the stored documents (no model needed)."""
    store = open_raw_store(store_path(args.store), read_only=True)
    try:
        rows = []
        by_collection: dict[str, list[str]] = {}
        for coll, doc_id in store.list_documents(args.collection):
            by_collection.setdefault(coll, []).append(doc_id)
        for coll, ids in sorted(by_collection.items()):
            for info in store.get(ids, collection=coll):
                rows.append({"doc_id": info.doc_id, "collection": info.collection, "tokens": info.num_tokens,
                             "chars": len(info.text), "added": info.created.isoformat(timespec="seconds"),
                             "metadata": dict(info.metadata)})
    finally:
        store.close()
    out.json(rows)
    if not rows:
        out.text("(no documents)" if args.collection is None else f"(no documents in collection {args.collection!r})")
        return 0
    width = max(len(r["doc_id"]) for r in rows)
    out.text(f"{'ID':<{width}}  {'COLLECTION':<12} {'TOKENS':>8} {'CHARS':>9}  ADDED")
    for r in rows:
        out.text(f"{r['doc_id']:<{width}}  {r['collection']:<12} {r['tokens']:>8,} {r['chars']:>9,}  {r['added']}")
    out.text(f"{len(rows)} document(s), {sum(r['tokens'] for r in rows):,} tokens")
    return 0


def cmd_rm(args: argparse.Namespace, out: Output) -> int:
    """Delete documents by id (rows, index vectors and K/V files); unknown ids delete nothing (no model needed)."""
    from ltri_rag.store import DocumentNotFound

    store = open_raw_store(store_path(args.store), read_only=False)
    try:
        store.delete(list(dict.fromkeys(args.ids)), collection=args.collection)
    except DocumentNotFound as err:
        present = sorted(doc_id for _, doc_id in store.list_documents(args.collection))
        hint = f" (it holds {len(present)}: {', '.join(present[:5])}{'...' if len(present) > 5 else ''})" if present \
            else ""
        raise CliError(f"not in collection {args.collection!r}: {', '.join(err.ids)}{hint}; nothing was deleted") \
            from None
    finally:
        store.close()
    out.json({"deleted": list(dict.fromkeys(args.ids)), "collection": args.collection})
    out.text(f"deleted {len(set(args.ids))} document(s) from collection {args.collection!r}")
    return 0


# ------------------------------------------------------------------------------------------------- stats / verify
def cmd_stats(args: argparse.Namespace, out: Output) -> int:
    """Sizes of the store, its collections, its model and engine config (no model needed)."""
    path = store_path(args.store)
    store = open_raw_store(path, read_only=True)
    try:
        stats = store.stats()
        collections = {c: len(store.list_documents(c)) for c in store.collections()}
        model = fingerprint_summary(store)
        config = stored_config(store).to_dict()
    finally:
        store.close()
    note = read_note(path)
    result = {"store": str(path), "model": note.get("model"), "documents": stats.documents, "spans": stats.spans,
              "vectors": stats.vectors, "tokens": stats.tokens, "bytes_on_disk": stats.bytes_on_disk,
              "bytes_per_token": round(stats.bytes_per_token, 1) if stats.tokens else None,
              "collections": collections, "fingerprint": model, "config": config}
    out.json(result)
    out.text(f"store        {path}")
    out.text(f"model        {note.get('model') or '(not recorded)'} ({model.get('model.type')}, "
             f"{model.get('num_layers')} layers, {model.get('dtype')})")
    out.text(f"documents    {stats.documents:,} in {len(collections)} collection(s): "
             + ", ".join(f"{c} ({n})" for c, n in sorted(collections.items())))
    out.text(f"tokens       {stats.tokens:,}")
    out.text(f"spans        {stats.spans:,} ({stats.vectors:,} index vectors)")
    per_token = f" ({stats.bytes_per_token:,.0f} bytes/token)" if stats.tokens else ""
    out.text(f"disk         {stats.bytes_on_disk / 2**20:,.1f} MiB{per_token}")
    out.text(f"config       mode={config['mode']} window={config['local_window']} budget={config['budget']} "
             f"sinks={config['num_sink_tokens']} spans={config['span_min_len']}-{config['span_max_len']}")
    return 0


def _report_dict(report: Any) -> dict[str, Any]:
    return {"clean": report.clean, "missing_files": list(report.missing_files),
            "checksum_failures": list(report.checksum_failures), "shape_mismatches": list(report.shape_mismatches),
            "orphan_files": list(report.orphan_files),
            "index_missing": {str(k): v for k, v in report.index_missing.items()},
            "index_extra": {str(k): v for k, v in report.index_extra.items()},
            "stale_layers": list(report.stale_layers)}


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    """Check the metadata database, FAISS indexes and K/V files against each other (exit 1 when not clean);
    ``--repair`` fixes what can be fixed (no model needed)."""
    path = store_path(args.store)
    store = open_raw_store(path, read_only=True)  # opening for writing repairs some problems at once: look first
    try:
        report = after = store.verify()
    finally:
        store.close()
    if args.repair and not report.clean:
        store = open_raw_store(path, read_only=False)
        try:
            store.repair()
            after = store.verify()
        finally:
            store.close()
    result = {"store": str(path), **_report_dict(report), "repaired": bool(args.repair),
              "clean_after": after.clean}
    out.json(result)
    if report.clean:
        out.text(f"{path}: clean (metadata, FAISS indexes and K/V files agree)")
        return 0
    for key, value in _report_dict(report).items():
        if key != "clean" and value:
            out.text(f"{key}: {value}")
    if args.repair:
        out.text(f"repaired; now {'clean' if after.clean else 'still not clean'}")
        return 0 if after.clean else 1
    out.text(f"{path}: NOT clean; run `ltri-rag verify --repair` to fix what can be fixed")
    return 1
