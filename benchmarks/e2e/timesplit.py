"""The profiled time split: one model pass under ``torch.profiler``, its device (or CPU) time split into attention,
retrieval, memory upkeep, weights, copies and other by the engine's stage labels and the operator names."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, schedule

from benchmarks.e2e.device import sync
from benchmarks.profile_engine import STAGES, _device_time, _self_device_time

STAGE_CATEGORY = {
    "ltri.retrieve.score_select": "retrieval: score+select",
    "ltri.retrieve.gather": "retrieval: gather",
    "ltri.retrieve": "retrieval: assemble",
    "ltri.attend_memory": "attention",
    "ltri.attend_local": "attention",
    "ltri.attend_decode": "attention",
    "ltri.absorb": "memory upkeep",
    "ltri.evict_segment_store": "memory upkeep",
    "ltri.segment_triangle": "memory upkeep",
}
CATEGORIES = ("weights", "attention", "retrieval: score+select", "retrieval: gather", "retrieval: assemble",
              "memory upkeep", "copies", "other")
WEIGHT_OPS = {"aten::linear", "aten::addmm", "aten::mm", "aten::matmul"}
COPY_OPS = {"aten::copy_", "aten::cat", "aten::index", "aten::index_put_", "aten::_index_put_impl_", "aten::_to_copy",
            "aten::to", "aten::clone", "aten::contiguous", "aten::index_select", "aten::gather", "aten::scatter_",
            "aten::fill_", "aten::zero_", "aten::zeros", "aten::index_copy_", "aten::slice_scatter"}


# Triton kernels run outside any PyTorch operator, so the profiler ties their device time to no CPU event: they are
# filed by kernel name (the engine's kernels in ``kernels/triton_*.py``), when their time is not already counted
TRITON_CATEGORY = {"_local_fwd_kernel": "attention", "_local_key_mass_kernel": "attention",
                   "_decode_split_kernel": "attention", "_decode_finish_kernel": "attention",
                   "_span_stats_kernel": "retrieval: score+select", "_span_mass_kernel": "retrieval: score+select"}


TOP_KERNELS = 20


def _category(event: Any) -> str:
    """Which part of the work a profiled operator belongs to (by its innermost engine stage, else its name)."""
    names = []
    node = event
    while node is not None:
        names.append(node.name)
        node = node.cpu_parent
    for name in names:
        if name in STAGE_CATEGORY:
            return STAGE_CATEGORY[name]
    if any(name in WEIGHT_OPS for name in names):
        return "weights"
    if any("attention" in name.lower() for name in names):
        return "attention"
    if event.name in COPY_OPS or event.name.startswith("Memcpy"):
        return "copies"
    return "other"


def split_time(events: Any, cuda: bool) -> dict[str, Any]:
    """Milliseconds per category (device time on CUDA, CPU self time elsewhere), plus the stage totals and the
    ``TOP_KERNELS`` kernels (and copies) of the device timeline by time, with their launch counts (empty on CPU)."""
    from torch.autograd import DeviceType

    cats: dict[str, float] = defaultdict(float)
    triton: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # name -> [ms, launches]
    kernels = 0.0
    stage_ms: dict[str, float] = defaultdict(float)
    for event in events:
        on_cpu = event.device_type == DeviceType.CPU
        if not on_cpu:  # a kernel or copy on the device timeline (device-side annotations skipped)
            annotation = getattr(event, "is_user_annotation", False) or event.name.startswith(
                ("ltri.", "ProfilerStep"))
            if not annotation:
                kernels += _self_device_time(event) / 1e3
                by_kernel[event.name][0] += _self_device_time(event) / 1e3
                by_kernel[event.name][1] += 1
                if event.name in TRITON_CATEGORY:
                    triton[TRITON_CATEGORY[event.name]] += _self_device_time(event) / 1e3
            continue
        own = (_self_device_time(event) if cuda else float(event.self_cpu_time_total)) / 1e3
        if own > 0:
            cats[_category(event)] += own
        if event.name in STAGES:  # stage totals, children included (device time on CUDA)
            stage_ms[event.name] += (_device_time(event) if cuda else float(event.cpu_time_total)) / 1e3
    busy = sum(cats.values())
    triton_ms = sum(triton.values())
    # the Triton kernels' time is added only where the operators left it out (kernel time beyond busy holds it)
    if cuda and triton_ms and triton_ms <= kernels - busy + 1e-6:
        for category, ms in triton.items():
            cats[category] += ms
        busy += triton_ms
    top = sorted(by_kernel.items(), key=lambda item: -item[1][0])[:TOP_KERNELS]
    return {"categories_ms": {c: cats.get(c, 0.0) for c in CATEGORIES}, "busy_ms": busy,
            "kernels_ms": kernels if cuda else None, "unattributed_ms": max(0.0, kernels - busy) if cuda else 0.0,
            "triton_ms": dict(triton), "stages_ms": dict(stage_ms),
            "top_kernels": [{"name": name, "ms": ms, "launches": n} for name, (ms, n) in top]}


def profile_pass(model: nn.Module, device: torch.device, run: Callable[[], Any], active_pass: int,
                 passes: list[Callable[[], Any]] | None = None) -> dict[str, Any]:
    """Profile model pass number ``active_pass`` (0-based) of ``run()``: wall ms and the split of its time.

    A forward pre-hook on the model synchronises, time-stamps and steps the profiler before every pass, so the
    recorded window holds exactly one pass and whatever the engine does after it (``commit``) until the next.
    ``passes`` (then ``run`` is ignored): the passes as calls of their own, stepped between the calls instead of by
    the hook: what a decode step replayed as a CUDA graph needs, as a replay runs no model forward.
    """
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, schedule=schedule(wait=active_pass, warmup=1, active=1, repeat=1))
    stamps: list[float] = []

    def step(*_: Any) -> None:
        sync(device)
        stamps.append(time.perf_counter())
        prof.step()

    handle = None if passes is not None else model.register_forward_pre_hook(step)
    try:
        with prof:
            if passes is None:
                run()
            else:
                for one in passes:
                    step()
                    one()
            sync(device)
            stamps.append(time.perf_counter())
    finally:
        if handle is not None:
            handle.remove()
    if len(stamps) < active_pass + 2:
        raise RuntimeError(f"only {len(stamps) - 1} model passes ran; cannot profile pass {active_pass}")
    wall_ms = (stamps[active_pass + 1] - stamps[active_pass]) * 1e3
    return {"wall_ms": wall_ms, "passes": len(stamps) - 1, **split_time(prof.events(), cuda)}
