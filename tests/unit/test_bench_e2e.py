"""The end-to-end speed benchmark runs on a tiny random Llama on CPU: rows per (mode, length), the OOM path, the
time budget and the command-line checks (the speed numbers themselves come from the GPU, not from tests)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_e2e
from benchmarks.bench_e2e import Track, main


def _rows(result: dict, phase: str) -> dict[tuple[str, int], dict]:
    return {(r["mode"], r["length"]): r for r in result[phase]}


def test_small_run_writes_a_row_per_mode_and_length(tmp_path) -> None:
    main(["--small", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench.json").read_text())
    modes, lengths = ("full", "ltri", "streaming"), (256, 512)
    prefill, decode = _rows(result, "prefill"), _rows(result, "decode")
    assert set(prefill) == set(decode) == {(m, n) for m in modes for n in lengths}
    for row in prefill.values():
        assert row["status"] == "ok", row
        assert row["seconds"] > 0 and row["tokens_per_s"] > 0 and row["floor_s"] > 0
    for row in decode.values():
        assert row["status"] == "ok", row
        assert row["tokens"] == 4 and len(row["times_ms"]) == 4 and row["median_ms"] > 0
        assert row["loop_steps"] == 4 and row["loop_ms"] > 0 and row["loop_sync_ms"] > 0  # the generation loop
        assert row["floor_weights_kv_ms"] > row["floor_weights_ms"] > 0
        kinds = row["step_kinds"]  # each timed step counted once, under one kind
        assert sum(v["steps"] for v in kinds.values()) == 4 and set(kinds) <= {"evict", "capture", "replay", "eager"}
        assert abs(sum(v["total_ms"] for v in kinds.values()) - sum(row["times_ms"])) < 0.01
        if row["mode"] == "streaming":
            assert "evict" not in kinds  # no span memory: nothing is counted as stored
    profiles = {(p["mode"], p["length"], p["kind"]): p for p in result["profile"]}
    assert all(p["status"] == "ok" for p in profiles.values())
    assert {("full", 512, "decode step"), ("ltri", 512, "decode step"), ("ltri", 512, "prefill chunk")} <= set(profiles)
    ltri = profiles[("ltri", 512, "decode step")]["categories_ms"]
    assert ltri["attention"] > 0 and ltri["weights"] > 0
    assert ltri["retrieval: score+select"] > 0  # the tiny window evicts: ltri retrieves at 512 tokens
    assert profiles[("full", 512, "decode step")]["categories_ms"]["retrieval: score+select"] == 0
    assert result["meta"]["command"].startswith("python -m benchmarks.bench_e2e --small")
    text = (tmp_path / "bench.md").read_text()
    assert "| 512 |" in text and "Where the time goes" in text and "## Targets" in text
    assert "Time per output token in the generation loop" in text
    targets = [line for line in text.splitlines() if "median step max/min" in line]
    assert targets and all("generation loop ms/token (mean) max/min" in line for line in targets)
    for line in targets:  # the target once, on the generation loop's mean, not on the median step
        assert line.count("(target <= 1.15)") == 1 and "(target <= 1.15)" in line.split("generation loop")[1]
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_gpu_pool_variant_and_host_load(tmp_path) -> None:
    """``ltri_gpu_pool`` is ltri with the span pool on the model's device; the run records the host's load."""
    from benchmarks.e2e.modes import engine_config

    variant = engine_config("ltri_gpu_pool", {"local_window": 64}, "torch")
    plain = engine_config("ltri", {"local_window": 64}, "torch")
    assert (variant.mode, variant.kv_offload, variant.local_window) == ("ltri", False, 64)
    assert plain.kv_offload == "auto"
    assert engine_config("ltri_host_pool", {}, "torch").kv_offload is True
    assert engine_config("ltri_c512", {}, "torch").chunk_size == 512
    assert engine_config("ltri_stride8", {}, "torch").decode_retrieval_stride == 8
    assert engine_config("ltri_device_select", {}, "torch").selection_on_device is True
    assert engine_config("ltri_all_queries", {}, "torch").score_queries is None
    assert engine_config("ltri_host_select", {}, "torch").selection_on_device is False
    assert (plain.selection_on_device, plain.score_queries) == ("auto", 256)
    result = main(["--small", "--modes", "ltri_gpu_pool", "--lengths", "256", "--decode-lengths", "256",
                   "--decode-tokens", "2", "--no-profile", "--out", str(tmp_path)])
    assert [r["status"] for r in result["prefill"] + result["decode"]] == ["ok", "ok"]
    load = result["meta"]["host_load"]
    assert load["cpus"] >= 1 and load["torch_threads"] >= 1 and len(load["loadavg"]) == 3
    assert "load average" in (tmp_path / "bench.md").read_text()


def test_out_of_memory_is_a_row_and_the_run_goes_on(tmp_path, monkeypatch) -> None:
    real = bench_e2e.run_prefill

    def flaky(session, ids):
        if session.config.mode == "full" and ids.shape[1] == 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return real(session, ids)

    monkeypatch.setattr("benchmarks.e2e.runs.run_prefill", flaky)
    result = main(["--small", "--modes", "full", "ltri", "--decode-tokens", "2", "--no-profile",
                   "--out", str(tmp_path)])
    prefill, decode = _rows(result, "prefill"), _rows(result, "decode")
    assert prefill[("full", 256)]["status"] == "OOM" and "64.00 GiB" in prefill[("full", 256)]["reason"]
    assert decode[("full", 256)]["status"] == "OOM"
    assert prefill[("full", 512)]["status"] == "skipped" and "OOM at 256" in prefill[("full", 512)]["reason"]
    for key in (("ltri", 256), ("ltri", 512)):  # rows after the OOM still ran
        assert prefill[key]["status"] == "ok" and decode[key]["status"] == "ok"
    assert "OOM" in (tmp_path / "bench.md").read_text()
    assert json.loads((tmp_path / "bench.json").read_text())["prefill"][0]["status"] == "OOM"


def test_prefill_repeats_keep_the_median_and_every_time(tmp_path) -> None:
    """``--prefill-repeats 3``: each (mode, length) reads its prompt three times, each by a fresh session; the row's
    seconds are the median of the three and the decode continues the last read."""
    result = main(["--small", "--modes", "ltri", "--lengths", "256", "--decode-lengths", "256", "--decode-tokens", "2",
                   "--prefill-repeats", "3", "--no-profile", "--out", str(tmp_path)])
    row = _rows(result, "prefill")[("ltri", 256)]
    assert row["status"] == "ok" and len(row["repeat_seconds"]) == 3
    assert row["seconds"] == sorted(row["repeat_seconds"])[1]
    assert _rows(result, "decode")[("ltri", 256)]["status"] == "ok"
    assert result["meta"]["prefill_repeats"] == 3


def test_time_limit_skips_and_says_why(tmp_path) -> None:
    result = main(["--small", "--modes", "streaming", "--time-limit", "0.001", "--no-profile", "--out", str(tmp_path)])
    assert result["prefill"] and all(r["status"] == "skipped" and "time" in r["reason"] for r in result["prefill"])


def test_prediction_scales_the_last_length() -> None:
    track = Track()
    assert track.predict("ltri", 1024, with_decode=False) is None
    track.last_length, track.last_prefill_s, track.history = 1024, 2.0, [(1024, 2.0)]
    assert track.predict("full", 4096, with_decode=False) == pytest.approx(2.0 * 4 ** 2)  # default exponents
    assert track.predict("ltri", 4096, with_decode=False) == pytest.approx(2.0 * 4 ** 1.15)
    track.history = [(512, 1.0), (1024, 2.0)]  # measured growth: linear
    assert track.predict("full", 4096, with_decode=False) == pytest.approx(8.0)
    assert track.predict("full", 4096, with_decode=False, prefill_repeats=3) == pytest.approx(24.0)


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama-9b"], "unknown model 'llama-9b'"),
    (["--lengths", "0", "512"], "--lengths must be positive, got [0]"),
    (["--decode-tokens", "0"], "--decode-tokens must be >= 1, got 0"),
    (["--prefill-repeats", "0"], "--prefill-repeats must be >= 1, got 0"),
    (["--model", "a=x", "--model", "a=y"], "--model names must differ"),
])
def test_bad_arguments_are_named(tmp_path, capsys, argv, message) -> None:
    with pytest.raises(SystemExit):
        main(["--small", "--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_time_split_files_triton_kernels_by_name_once():
    # fake profiler events: one linear (CPU op with its device time), the two local-attention Triton kernels and a
    # scoring kernel on the device timeline with no CPU operator
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.e2e.timesplit import split_time

    def cpu(name, device_us, parent=None):
        return SimpleNamespace(device_type=DeviceType.CPU, name=name, self_device_time_total=device_us,
                               cpu_parent=parent, self_cpu_time_total=0, cpu_time_total=0, device_time_total=device_us)

    def dev(name, us):
        return SimpleNamespace(device_type=DeviceType.CUDA, name=name, self_device_time_total=us,
                               is_user_annotation=False)

    events = [cpu("aten::linear", 5000.0), dev("sm90_gemm", 5000.0), dev("_local_fwd_kernel", 3000.0),
              dev("_local_key_mass_kernel", 1000.0), dev("_span_mass_kernel", 2000.0)]
    split = split_time(events, cuda=True)
    assert split["categories_ms"]["weights"] == 5.0
    assert split["categories_ms"]["attention"] == 4.0
    assert split["categories_ms"]["retrieval: score+select"] == 2.0
    assert split["busy_ms"] == 11.0 and split["kernels_ms"] == 11.0 and split["unattributed_ms"] == 0.0
    # the device timeline's kernels by time, with launch counts
    events.append(dev("_local_key_mass_kernel", 3000.0))
    split = split_time(events, cuda=True)
    assert [(k["name"], k["ms"], k["launches"]) for k in split["top_kernels"]] == [
        ("sm90_gemm", 5.0, 1), ("_local_key_mass_kernel", 4.0, 2), ("_local_fwd_kernel", 3.0, 1),
        ("_span_mass_kernel", 2.0, 1)]
    events.pop()
    # where a CPU operator already carries the Triton time (busy covers every kernel), it is not counted twice
    events[0] = cpu("aten::linear", 11000.0)
    split = split_time(events, cuda=True)
    assert split["busy_ms"] == 11.0 and split["categories_ms"]["attention"] == 0.0


def test_host_pool_estimate_is_the_reserved_size() -> None:
    """The pinned-pool estimate behind ``--host-mem-gib`` is the size the engine reserves for a prompt (evicted
    tokens plus a sixteenth, in pages), less what fits in the device tier: no doubling (the engine no longer grows
    the pool while reading a prompt). Llama-3-8B's K/V at 1M tokens then fits a 128 GiB host beside a 48 GiB tier."""
    from types import SimpleNamespace

    from benchmarks.e2e.budget import pool_host_bytes
    from ltri_rag import LtriConfig

    info = SimpleNamespace(kv_bytes_per_token=2 * 32 * 8 * 128 * 2)  # Llama-3-8B, bf16: 128 KiB
    cfg = LtriConfig(mode="ltri", kv_offload=True)
    evicted = 1 << 20
    evicted -= cfg.local_window + cfg.num_sink_tokens
    reserved = evicted + max(4 * cfg.evict_stride, evicted // 16)
    pages = -(-reserved // cfg.page_size)
    assert pool_host_bytes(info, 1 << 20, cfg) == pages * cfg.page_size * info.kv_bytes_per_token
    tiered = LtriConfig(mode="ltri", kv_device_gib=48)
    host_gib = pool_host_bytes(info, 1 << 20, tiered) / 2**30
    assert 80 < host_gib < 90
    assert pool_host_bytes(info, 1 << 20, LtriConfig(mode="ltri", kv_offload=False)) == 0
    assert pool_host_bytes(info, 1000, cfg) == 0  # nothing leaves the window


def test_isolated_modes_run_in_processes_of_their_own_and_merge(tmp_path) -> None:
    """``--isolate``: each mode's rows come from its own child process (its own result folder), and the parent's
    result holds every (mode, length) row as a run without it would."""
    main(["--small", "--isolate", "on", "--modes", "ltri", "streaming", "--lengths", "256", "--decode-lengths", "256",
          "--no-profile", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench.json").read_text())
    prefill, decode = _rows(result, "prefill"), _rows(result, "decode")
    assert set(prefill) == set(decode) == {("ltri", 256), ("streaming", 256)}
    assert all(r["status"] == "ok" for r in [*prefill.values(), *decode.values()])
    for mode in ("ltri", "streaming"):
        child = json.loads((tmp_path / "modes" / mode / "bench.json").read_text())
        assert [r["mode"] for r in child["prefill"]] == [mode]
        assert child["prefill"][0]["seconds"] == prefill[(mode, 256)]["seconds"]
        assert result["meta"]["isolated"][mode]["exit_status"] == 0
    assert [m["name"] for m in result["models"]] == ["tiny-llama-random"]
    assert "| 256 |" in (tmp_path / "bench.md").read_text()


def test_isolated_child_without_a_result_is_an_error_row(tmp_path, monkeypatch) -> None:
    """A mode whose process writes nothing (here: a command that fails at once) becomes error rows naming the exit
    status, and the other modes still run."""
    from benchmarks.e2e import isolate

    real = isolate.child_command

    def broken_for_ltri(words, mode, out, time_limit):
        command = real(words, mode, out, time_limit)
        return [command[0], "-c", "raise SystemExit(3)"] if mode == "ltri" else command

    monkeypatch.setattr(isolate, "child_command", broken_for_ltri)
    main(["--small", "--isolate", "on", "--modes", "ltri", "streaming", "--lengths", "256", "--decode-lengths", "256",
          "--no-profile", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench.json").read_text())
    prefill = _rows(result, "prefill")
    assert prefill[("ltri", 256)]["status"] == "error" and "exit status 3" in prefill[("ltri", 256)]["reason"]
    assert _rows(result, "decode")[("ltri", 256)]["status"] == "error"
    assert prefill[("streaming", 256)]["status"] == "ok"


def test_isolation_by_default_only_on_cuda_with_several_modes() -> None:
    """``--isolate auto`` isolates on CUDA when there is more than one mode; ``on`` / ``off`` force it."""
    from argparse import Namespace

    from benchmarks.e2e.cli import _isolating

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    two, one = ["ltri", "full"], ["ltri"]
    assert _isolating(Namespace(isolate="auto", modes=two), cuda)
    assert not _isolating(Namespace(isolate="auto", modes=two), cpu)
    assert not _isolating(Namespace(isolate="auto", modes=one), cuda)
    assert _isolating(Namespace(isolate="on", modes=two), cpu)
    assert not _isolating(Namespace(isolate="off", modes=two), cuda)


def test_every_mode_is_buildable_and_patches_existing_settings() -> None:
    """Each mode has an engine configuration, and each module patch of an A/B mode names a setting that exists
    (``setattr`` on a misspelt name would silently measure the default twice) and is restored afterwards."""
    import importlib

    from benchmarks.e2e.modes import MODES, MODULE_PATCHES, engine_config, mode_context

    for mode in MODES:
        engine_config(mode, {}, "torch")
    assert set(MODULE_PATCHES) <= set(MODES)
    for mode, patches in MODULE_PATCHES.items():
        before = []
        for module_name, name, value in patches:
            module = importlib.import_module(module_name)
            assert hasattr(module, name), f"{mode}: {module_name}.{name} does not exist"
            before.append((module, name, getattr(module, name)))
        with mode_context(mode, "auto"):
            for (module, name, _), (_, _, value) in zip(before, patches):
                assert getattr(module, name) == value
        for module, name, value in before:
            assert getattr(module, name) == value


def test_decode_target_is_checked_on_the_per_token_mean_where_there_is_one() -> None:
    """With a retrieval stride the median step is a reusing step: the 1.15x target goes on the generation loop's
    mean when the rows have one, on the median otherwise."""
    from benchmarks.e2e.report import summarize

    def rows(loops):
        return [{"model": "m", "mode": "ltri_fast", "length": n, "status": "ok", "median_ms": 8.0,
                 **({"loop_ms": loop} if loop else {})} for n, loop in zip((8192, 1 << 20), loops)]

    prefill = [{"model": "m", "mode": "ltri_fast", "length": n, "status": "ok", "seconds": s}
               for n, s in ((8192, 1.0), (1 << 20, 120.0))]
    with_loop = summarize(prefill, rows((10.0, 12.0)))["m"]["ltri_fast"]
    assert with_loop["decode_max_over_min"] == 1.0 and with_loop["loop_max_over_min"] == pytest.approx(1.2)
    without = summarize(prefill, rows((None, None)))["m"]["ltri_fast"]
    assert "loop_max_over_min" not in without and without["decode_max_over_min"] == 1.0


def test_step_kinds_name_what_a_decode_step_did() -> None:
    """A step after which the span memory grew is an eviction (whatever ran it); else a capture, a replay or an eager
    step, from the graph counters around it; the summary counts and times each kind."""
    from benchmarks.e2e.runs import kind_summary, step_kind

    assert step_kind((100, 1, 5), (164, 2, 6)) == "evict"
    assert step_kind((164, 1, 5), (164, 2, 5)) == "capture"
    assert step_kind((164, 2, 5), (164, 2, 6)) == "replay"
    assert step_kind((0, 0, 0), (0, 0, 0)) == "eager"
    summary = kind_summary([10.0, 11.0, 150.0, 12.0], ["replay", "replay", "evict", "replay"])
    assert summary == {"evict": {"steps": 1, "median_ms": 150.0, "total_ms": 150.0},
                       "replay": {"steps": 3, "median_ms": 11.0, "total_ms": 33.0}}
