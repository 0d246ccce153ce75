"""The measurements: timed prefill and decode, and the grid of one invocation (every model x length x mode, with
warm-up, skips, OOM / error / stopped rows, profiling) whose rows are rewritten to ``--out`` after each one."""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.e2e.budget import BudgetExceeded, Track, deadline_guard, pool_host_bytes
from benchmarks.e2e.device import GIB, free_memory, is_oom, peak_gib, pinned_stats, reset_peak, rss_gib, sync
from benchmarks.e2e.floors import chunk_floor_ms, decode_floor_ms, prefill_floor_seconds
from benchmarks.e2e.models import ModelInfo
from benchmarks.e2e.modes import RETRIEVING, engine_config, random_ids, mode_context
from benchmarks.e2e.plot import plot_results
from benchmarks.e2e.report import fmt, render, summarize
from benchmarks.e2e.timesplit import profile_pass
from ltri_rag import LtriConfig, LtriSession
from ltri_rag.generation import decoded_tokens


def _counts_host_cache() -> bool:
    """Whether the one-launch assembly counts host rows read from its device cache (a mode's patch sets it)."""
    try:
        from ltri_rag.kernels import triton_assemble
    except ImportError:  # no triton
        return False
    return bool(triton_assemble.COUNT_HOST_CACHE)


def run_prefill(session: LtriSession, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds of one prefill of ``ids`` (``[1, length]``) on ``session``, synchronised; and the last logits."""
    device = session.device
    sync(device)
    began = time.perf_counter()
    logits = session.feed(ids)
    sync(device)
    return time.perf_counter() - began, logits


def run_decode(session: LtriSession, logits: torch.Tensor, num_tokens: int,
               kinds: list[str] | None = None) -> tuple[list[float], torch.Tensor]:
    """Milliseconds of each of ``num_tokens`` greedy single-token steps (each synchronised), and the last step's
    ``[1, vocab]`` logits. ``kinds``, when given, receives each step's kind (:func:`step_kind`)."""
    device = session.device
    times = []
    token = logits.argmax(-1)
    for _ in range(num_tokens):
        before = _step_counters(session) if kinds is not None else None
        sync(device)
        began = time.perf_counter()
        logits = session.step(token)
        token = logits.argmax(-1)
        sync(device)
        times.append((time.perf_counter() - began) * 1e3)
        if kinds is not None:
            kinds.append(step_kind(before, _step_counters(session)))
    return times, logits


def _step_counters(session: Any) -> tuple[int, int, int]:
    """``(memory tokens, graphs captured, graph replays)`` of a session (0 where it keeps none)."""
    cache = getattr(session, "cache", None)
    memory = cache.memory_tokens() if cache is not None and hasattr(cache, "memory_tokens") else 0
    graph = getattr(session, "decode_graph", None)
    return memory, (graph.captures if graph is not None else 0), (graph.replays if graph is not None else 0)


def step_kind(before: tuple[int, int, int], after: tuple[int, int, int]) -> str:
    """What a decode step did, from :func:`_step_counters` around it: ``"evict"`` (its window's oldest tokens went
    to the span memory after it), ``"capture"`` (a CUDA graph was captured for it), ``"replay"`` (a captured graph
    ran it), else ``"eager"``. An evicting step is ``"evict"`` whatever ran it."""
    if after[0] > before[0]:
        return "evict"
    if after[1] > before[1]:
        return "capture"
    return "replay" if after[2] > before[2] else "eager"


def kind_summary(times: list[float], kinds: list[str]) -> dict[str, dict[str, float]]:
    """Per step kind: how many timed steps, their median and total ms."""
    out: dict[str, dict[str, float]] = {}
    for kind in sorted(set(kinds)):
        picked = [t for t, k in zip(times, kinds) if k == kind]
        out[kind] = {"steps": len(picked), "median_ms": round(statistics.median(picked), 3),
                     "total_ms": round(sum(picked), 3)}
    return out


def run_generation_loop(session: LtriSession, logits: torch.Tensor, num_steps: int, ahead: bool
                        ) -> tuple[float, torch.Tensor]:
    """Mean milliseconds per token of ``num_steps`` greedy steps run the way ``ltri_rag.generate`` runs them
    (:func:`ltri_rag.generation.decoded_tokens`; ``ahead``: one step ahead, as on CUDA by default, each token copied
    to the host while the step reading it is already queued; otherwise one step at a time, each token read back
    before the next step is launched), synchronised only at the start and the end; and the ``[1, vocab]`` logits
    after one more, untimed step that reads the last token. ``logits``: ``[1, vocab]`` of the last token read."""
    device = session.device
    sync(device)
    began = time.perf_counter()
    tokens = list(decoded_tokens(session, logits[0], num_steps + 1, ahead=ahead))  # n + 1 tokens take n steps
    sync(device)
    ms = (time.perf_counter() - began) * 1e3 / max(1, num_steps)
    return ms, session.step(torch.tensor(tokens[-1:]))


class Bench:
    """Runs the grid of one invocation and keeps its rows; :meth:`save` writes them."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                 engine: dict[str, Any], meta: dict[str, Any]) -> None:
        self.args = args
        self.device = device
        self.dtype = dtype
        self.engine = engine
        self.meta = meta
        self.prefill: list[dict[str, Any]] = []
        self.decode: list[dict[str, Any]] = []
        self.profiles: list[dict[str, Any]] = []
        self.models: list[dict[str, Any]] = []
        self.began = time.perf_counter()
        self.deadline = self.began + args.time_limit

    def remaining(self) -> float:
        """Seconds left of ``--time-limit``."""
        return self.deadline - time.perf_counter()

    def _config(self, mode: str) -> LtriConfig:
        """The engine configuration of ``mode`` in this run."""
        return engine_config(mode, self.engine, self.args.backend)

    # ------------------------------------------------------------------------------------------------- run
    def run_model(self, info: ModelInfo) -> None:
        """Every length x mode of one model, shortest lengths first."""
        args = self.args
        self.models.append(info.describe())
        warm = {}
        for mode in args.modes:
            warm[mode] = self._warm_up(info, mode)
        self.meta.setdefault("warm_up_seconds", {})[info.name] = warm
        tracks = {mode: Track() for mode in args.modes}
        decode_set = set(args.decode_lengths)
        prefill_set = set(args.lengths)
        for length in sorted(prefill_set | decode_set):
            ids = random_ids(info.vocab_size, length, args.seed)
            for mode in args.modes:
                reason = self._skip_reason(info, mode, length, tracks[mode], length in decode_set)
                if reason is not None:
                    self._skipped(info, mode, length, length in decode_set, reason)
                else:
                    self._measure(info, mode, length, ids, length in decode_set, tracks[mode])
                free_memory(self.device)
                self.save()

    def _warm_up(self, info: ModelInfo, mode: str) -> float | str:
        """One short prefill and two decode steps (kernels compiled, caches warm); seconds, or the error. An ltri
        mode warms up at the run's shortest length when that is short (at most 4x the engine's shortest full
        pass, or shorter than it), so that its first timed prefill meets no kernel variant the warm-up did not
        compile: its last passes have the same lengths (the first timed 8K prefill of session 17's runs took
        5.8-7.8 s after a warm-up at 8,336 tokens, later modes 0.7 s, and the time-based skips then extrapolated
        from it; session 18's first call still warmed up at 8,336 tokens for an 8,192-token run, 5.0 s)."""
        config = self._config(mode)
        shortest = min(self.args.lengths + self.args.decode_lengths)
        if mode == "full":
            length = min(2048, shortest)
        else:
            length = config.num_sink_tokens + config.local_window + 2 * config.chunk_size + config.final_chunk_size
            if shortest <= 4 * length:
                length = shortest
        ids = random_ids(info.vocab_size, length, self.args.seed + 1)
        began = time.perf_counter()
        try:
            with mode_context(mode, self.args.sdpa_backend):
                session = LtriSession(info.model, config)
                _, logits = run_prefill(session, ids)
                _, logits = run_decode(session, logits, 2)
                _, logits = run_generation_loop(session, logits, 2, ahead=False)
                run_generation_loop(session, logits, 2, ahead=True)
            del session, logits
        except Exception as err:  # noqa: BLE001 - recorded; the timed runs will show the same error
            return f"error: {type(err).__name__}: {err}"
        finally:
            free_memory(self.device)
        return round(time.perf_counter() - began, 2)

    def _skip_reason(self, info: ModelInfo, mode: str, length: int, track: Track, with_decode: bool) -> str | None:
        if track.failed is not None:
            return f"{track.failed} (a smaller length)"
        left = self.remaining()
        predicted = track.predict(mode, length, with_decode, self.args.prefill_repeats)
        if predicted is not None and predicted > left:
            return (f"time: {predicted:.0f} s predicted from {track.last_prefill_s:.1f} s at {track.last_length} "
                    f"(growth exponent {track.exponent(mode):.2f}), {left:.0f} s left")
        if left <= 0:
            return "time: the run's time limit was reached"
        config = self._config(mode)
        if mode in RETRIEVING and self.args.host_mem_gib:
            device_free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0.0
            need = pool_host_bytes(info, length, config, device_free) / GIB
            free = 0.9 * self.args.host_mem_gib - (rss_gib() or 0.0)
            if need > free:
                return (f"host memory: the pinned span pool may need {need:.0f} GiB, "
                        f"{free:.0f} GiB usable of --host-mem-gib {self.args.host_mem_gib:.0f}")
        return None

    def _skipped(self, info: ModelInfo, mode: str, length: int, with_decode: bool, reason: str) -> None:
        base = {"model": info.name, "mode": mode, "length": length, "status": "skipped", "reason": reason}
        self.prefill.append(dict(base, phase="prefill"))
        if with_decode:
            self.decode.append(dict(base, phase="decode"))
        print(f"[{info.name} {mode} {length}] skipped: {reason}", flush=True)

    def _measure(self, info: ModelInfo, mode: str, length: int, ids: torch.Tensor, with_decode: bool,
                 track: Track) -> None:
        """Prefill (and decode, profile) one (model, mode, length); every failure becomes a row."""
        args = self.args
        config = self._config(mode)
        tag = f"[{info.name} {mode} {length}]"
        base = {"model": info.name, "mode": mode, "length": length,
                "backend": config.attention_backend if mode != "full" else f"sdpa:{args.sdpa_backend}"}
        row = dict(base, phase="prefill")
        drow = dict(base, phase="decode") if with_decode else None
        extra_s = 0.0
        session = logits = None
        with mode_context(mode, args.sdpa_backend), deadline_guard(info.model, self.deadline):
            try:
                repeats = []
                for _ in range(args.prefill_repeats - 1):  # extra reads, each by a session of its own
                    session = LtriSession(info.model, config)
                    repeats.append(run_prefill(session, ids)[0])
                    session = None
                    free_memory(self.device)
                session = LtriSession(info.model, config)
                reset_peak(self.device)
                seconds, logits = run_prefill(session, ids)  # the read the decode steps continue
                if repeats:
                    repeats.append(seconds)
                    row["repeat_seconds"] = repeats
                    seconds = statistics.median(repeats)
                row.update(status="ok", seconds=seconds, tokens_per_s=length / seconds,
                           peak_gib=peak_gib(self.device), host_rss_gib=rss_gib(),
                           floor_s=prefill_floor_seconds(info, length, mode, config, args.peak_tflops),
                           pinned=pinned_stats() or None)
                row["x_floor"] = seconds / row["floor_s"]
                spread = (f" (median of {len(repeats)}: {min(repeats):.2f}-{max(repeats):.2f} s)"
                          if repeats else "")
                print(f"{tag} prefill {seconds:.2f} s{spread} ({length / seconds:,.0f} tok/s), peak "
                      f"{fmt(row['peak_gib'], '.2f')} GiB", flush=True)
            except Exception as err:  # noqa: BLE001 - recorded as a row; the grid goes on
                self._failure(row, err, tag + " prefill")
            self.prefill.append(row)
            if drow is not None:
                if row["status"] != "ok":
                    drow.update(status=row["status"], reason=f"the prefill before it: {row['status']}")
                    self.decode.append(drow)
                else:
                    began = time.perf_counter()
                    self._decode(info, mode, length, config, session, logits, drow, tag)
                    self.decode.append(drow)
                    if drow["status"] == "ok" and not args.no_profile:
                        self.save()  # the timed rows kept should the profiled passes outlast the call's time
                        self._profile(info, mode, length, config, session, tag)
                    extra_s = time.perf_counter() - began
        session = logits = None
        if row["status"] == "ok":
            track.last_length = length
            track.last_prefill_s = row["seconds"]
            track.last_extra_s = extra_s
            track.history.append((length, row["seconds"]))
        failed = [r["status"] for r in (row, drow) if r is not None and r["status"] != "ok"]
        if failed:
            track.failed = ("the time limit was reached" if failed[0] == "stopped"
                            else f"{failed[0]} at {length}")

    def _decode(self, info: ModelInfo, mode: str, length: int, config: LtriConfig, session: LtriSession,
                logits: torch.Tensor, row: dict[str, Any], tag: str) -> None:
        args = self.args
        try:
            reset_peak(self.device)
            pool = getattr(getattr(session, "cache", None), "pool", None)
            counting = pool is not None and pool.host_cache_tokens > 0 and _counts_host_cache()
            if counting:  # host rows read by the timed steps, and how many came from the device cache
                pool.host_cache_stats.zero_()
            kinds: list[str] = []
            times, logits = run_decode(session, logits, args.decode_tokens, kinds)
            if counting:
                hits, host_rows = pool.host_cache_stats.tolist()
                row.update(host_cache_hits=hits, host_cache_rows=host_rows)
                print(f"{tag} host rows read by the timed steps: {host_rows}, {hits} from the device cache", flush=True)
            weights_ms, kv_ms = decode_floor_ms(info, length, mode, config, args.hbm_tbps)
            median = statistics.median(times)
            graph = getattr(session, "decode_graph", None)
            if graph is not None:  # steps in graph form / replayed / graphs captured (the rest ran eagerly)
                row.update(graph_steps=graph.steps, graph_replays=graph.replays, graph_captures=graph.captures,
                           graph_retrieving_steps=graph.retrieving_steps,
                           graph_retrieving_replays=graph.retrieving_replays,
                           graph_evicting_replays=graph.evicting_replays)
            # (after the counts: those are the timed steps') the generation loop one step at a time, then ahead
            loop_sync_ms, logits = run_generation_loop(session, logits, args.decode_tokens, ahead=False)
            loop_ms, _ = run_generation_loop(session, logits, args.decode_tokens, ahead=True)
            row.update(status="ok", tokens=len(times), median_ms=median, mean_ms=statistics.fmean(times),
                       min_ms=min(times), max_ms=max(times), times_ms=[round(t, 3) for t in times],
                       step_kinds=kind_summary(times, kinds),
                       loop_sync_ms=loop_sync_ms, loop_ms=loop_ms, loop_steps=args.decode_tokens,
                       peak_gib=peak_gib(self.device), floor_weights_ms=weights_ms, floor_weights_kv_ms=kv_ms,
                       x_floor=median / kv_ms,
                       baseline=("Hugging Face eager, DynamicCache (engine mode full)" if mode == "full"
                                 else "ltri_rag engine, eager" if graph is None
                                 else "ltri_rag engine, decode steps replayed as CUDA graphs" if graph.replays
                                 else "ltri_rag engine, graphs on but every step eager (see graph_steps)"))
            print(f"{tag} decode {median:.1f} ms/token median, {statistics.fmean(times):.1f} mean of {len(times)} "
                  f"(floor {kv_ms:.2f} ms); generation loop {loop_sync_ms:.1f} ms/token one step at a time, "
                  f"{loop_ms:.1f} one step ahead (means of {args.decode_tokens} more each)"
                  + (f"; {graph.replays} replays ({graph.retrieving_replays} retrieving, {graph.evicting_replays} "
                     f"evicting), {graph.captures} captures"
                     if graph is not None else ""), flush=True)
            print(f"{tag} timed steps by kind: " + ", ".join(
                f"{kind} {v['steps']} x {v['median_ms']:.1f} ms median" for kind, v in row["step_kinds"].items()),
                flush=True)
        except Exception as err:  # noqa: BLE001
            self._failure(row, err, tag + " decode")

    def _profile(self, info: ModelInfo, mode: str, length: int, config: LtriConfig, session: LtriSession,
                 tag: str) -> None:
        """One decode step, then one full prefill chunk (engine modes) over this context, under the profiler."""
        args = self.args
        token = torch.zeros(1, dtype=torch.int64)
        # decode steps stepped one call at a time (a step replayed as a CUDA graph runs no model forward to hook)
        jobs: list[tuple[str, Callable[[], Any], int, int]] = [("decode step", lambda: None, 2, 1)]
        if mode != "full":
            piece = random_ids(info.vocab_size, 2 * config.chunk_size + config.final_chunk_size, args.seed + 2)
            jobs.append(("prefill chunk", lambda: session.feed(piece), 1, config.chunk_size))
        for kind, run, active, tokens in jobs:
            row = {"model": info.name, "mode": mode, "length": length, "phase": f"profile {kind}", "kind": kind,
                   "tokens": tokens}
            try:
                steps = [lambda: session.step(token)] * 3 if kind == "decode step" else None
                res = profile_pass(info.model, self.device, run, active, passes=steps)
                if kind == "decode step":
                    weights_ms, kv_ms = decode_floor_ms(info, length, mode, config, args.hbm_tbps)
                    res.update(floor_ms=kv_ms, floor_weights_ms=weights_ms)
                else:
                    res["floor_ms"] = chunk_floor_ms(info, mode, config, args.peak_tflops)
                row.update(status="ok", **res)
                print(f"{tag} profiled {kind}: {res['wall_ms']:.1f} ms wall, "
                      + ", ".join(f"{c} {ms:.1f}" for c, ms in res["categories_ms"].items() if ms > 0), flush=True)
            except Exception as err:  # noqa: BLE001
                self._failure(row, err, f"{tag} profile {kind}")
            self.profiles.append(row)

    def _failure(self, row: dict[str, Any], err: BaseException, what: str) -> str:
        """Record an exception in ``row``; return the status (``OOM``, ``stopped`` or ``error``)."""
        if is_oom(err):
            status, reason = "OOM", str(err).splitlines()[0][:300] if str(err) else "out of memory"
        elif isinstance(err, BudgetExceeded):
            status, reason = "stopped", f"time limit reached after {time.perf_counter() - self.began:.0f} s"
        else:
            status, reason = "error", f"{type(err).__name__}: {err}"[:500]
            row["traceback"] = traceback.format_exc()[-3000:]
        row.update(status=status, reason=reason)
        print(f"{what}: {status}: {reason}", flush=True)
        return status

    # ---------------------------------------------------------------------------------------------- output
    def result(self) -> dict[str, Any]:
        """Everything measured, as one JSON-able dict."""
        self.meta["elapsed_seconds"] = round(time.perf_counter() - self.began, 1)
        return {"meta": self.meta, "models": self.models, "prefill": self.prefill, "decode": self.decode,
                "profile": self.profiles, "summary": summarize(self.prefill, self.decode)}

    def save(self, plot: bool = False) -> str:
        """Write ``bench.json`` and ``bench.md`` (and ``bench.png`` with ``plot``); return the Markdown."""
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        result = self.result()
        tmp = out / "bench.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(out / "bench.json")
        text = render(result)
        (out / "bench.md").write_text(text, encoding="utf-8")
        if plot:
            note = plot_results(result, out / "bench.png")
            if note:
                print(note, flush=True)
        return text
