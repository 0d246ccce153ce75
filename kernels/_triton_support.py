"""What the Triton kernel modules share outside their kernels: the optional ``triton`` import, the interpreter
switch and small launch helpers (block-size checks, the GPU's multiprocessor count).

``triton`` / ``tl`` are None where triton does not import (it ships for Linux x86_64 only). Each kernel module
evaluates ``interpreted()`` itself when it is imported, because Triton decides how to build a kernel when it is
decorated: ``TRITON_INTERPRET`` must be set before that module is imported (or the module reloaded). The jit
helpers the kernels call stay in each kernel module for the same reason.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import weakref

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux x86_64 only
    triton = None
    tl = None
try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - no triton, or one without the error class
    class OutOfResources(Exception):  # type: ignore[no-redef]
        """Stands in for triton's error where triton does not provide it (never raised then)."""

        name = ""

__all__ = ["dependent_launch", "interpreted", "launch_fitting", "multiprocessors", "next_pow2", "pow2_block", "tl",
           "triton", "triton_available", "turns_per_position"]


def interpreted() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter (CPU tensors) now."""
    return triton is not None and os.environ.get("TRITON_INTERPRET", "0").strip().lower() in (
        "1", "true", "yes", "on", "y")


def triton_available() -> bool:
    """Whether triton imported (the kernels run on CUDA tensors, or on CPU tensors under the interpreter)."""
    return triton is not None


def pow2_block(value: int | None, default: int, name: str) -> int:
    """An explicit block size ``value`` (a power of two >= 16, else ``ValueError`` naming ``name``), or
    ``default`` when None."""
    if value is None:
        return default
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    return value


def next_pow2(value: int) -> int:
    """The smallest power of two >= ``value`` (1 for ``value <= 1``)."""
    return 1 << max(0, value - 1).bit_length()


@functools.cache
def multiprocessors(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (asked once)."""
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _compute_capability(index: int) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(index)


@functools.cache
def _triton_has_dependent_launch() -> bool:
    """Whether this triton compiles ``griddepcontrol`` (``tl.extra.cuda.gdc_wait`` / ``gdc_launch_dependents``) and
    launches with the programmatic-serialisation attribute (the ``launch_pdl`` launch option)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda as extra_cuda
    except ImportError:  # pragma: no cover - a triton without the NVIDIA backend
        return False
    fields = getattr(CUDAOptions, "__dataclass_fields__", {})
    return ("launch_pdl" in fields and hasattr(extra_cuda, "gdc_wait")
            and hasattr(extra_cuda, "gdc_launch_dependents"))


def dependent_launch(device) -> bool:
    """Whether a compiled Triton kernel on ``device`` may run as a *programmatic dependent launch*: started while
    the kernel before it on the stream is still running, its programs waiting (``gdc_wait``) until that kernel's
    writes are visible. Needs a CUDA device of compute capability 9.0 or later (Hopper) and a triton that has both
    halves; never under the interpreter."""
    if triton is None or interpreted() or getattr(device, "type", None) != "cuda":
        return False
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return _compute_capability(index)[0] >= 9 and _triton_has_dependent_launch()


# launches that needed a shallower pipeline than asked: (kernel, device, compile-time settings, dtypes) -> stages
_SHALLOWER: dict[tuple, int] = {}


def launch_fitting(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, made again one pipeline stage shallower (down to 1) each time Triton finds
    a block's shared memory too small for ``num_stages``: the kernels' depths were tuned on sm_90, whose blocks may
    take 227 KiB, and sm_86 / sm_89 GPUs give ~99 KiB. The depth that launched is kept for the same kernel, device,
    compile-time settings and argument dtypes, so later launches go straight to it. Other errors, and a launch that
    does not fit at one stage, are raised. Where no launch of the process has needed this, it costs one ``try``."""
    asked = kwargs.get("num_stages", 3)  # triton's default depth
    if _SHALLOWER:
        key = _fitting_key(kernel, args, kwargs)
        stages = _SHALLOWER.get(key, asked)
    else:
        try:
            return kernel[grid](*args, **kwargs)
        except OutOfResources as exc:
            if getattr(exc, "name", "") != "shared memory" or asked <= 1:
                raise
        key, stages = _fitting_key(kernel, args, kwargs), asked - 1
    while True:
        try:
            result = kernel[grid](*args, **{**kwargs, "num_stages": stages})
        except OutOfResources as exc:
            if getattr(exc, "name", "") != "shared memory" or stages <= 1:
                raise
            stages -= 1
            continue
        if stages != asked:
            _SHALLOWER[key] = stages
            logging.getLogger("ltri_rag").info(
                "%s: %d pipeline stages do not fit this GPU's shared memory per block; launched with %d",
                getattr(getattr(kernel, "fn", kernel), "__name__", type(kernel).__name__), asked, stages)
        return result


def _fitting_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """What decides a launch's shared memory: the kernel, the device, its compile-time settings and the dtypes of
    its tensor arguments (not the run-time sizes)."""
    tensors = [a for a in args if hasattr(a, "dtype") and hasattr(a, "device")]
    device = str(tensors[0].device) if tensors else None
    settings = tuple(sorted((k, v) for k, v in kwargs.items()
                            if k != "num_stages" and isinstance(v, (bool, int, float, str, type(None)))))
    return id(kernel), device, settings, tuple(str(t.dtype) for t in tensors)


# inverse frequencies -> their turns per position on a device: id(inv_freq) -> (weak reference, version, device,
# turns); turns made for an older version stay referenced (a CUDA graph captured with them may still read them)
_TURNS: dict[int, tuple[weakref.ref, int, object, object]] = {}
_RETIRED: list = []


def turns_per_position(inv_freq, device):
    """``inv_freq / (2 pi)`` in float64 on ``device`` (``[rot_dim / 2]``, contiguous), what the rotating kernels
    read: made once per inverse-frequency tensor and device (and again after an in-place change of it), so a layer's
    launch does not pay a cast and a division each time. While a CUDA graph is being captured nothing new is
    cached (a tensor made inside the capture holds its values only once the graph replays)."""
    import torch

    device = torch.device(device)
    key = id(inv_freq)
    try:
        version = inv_freq._version
    except RuntimeError:  # an inference tensor keeps no version counter: it is read as made
        version = -1
    hit = _TURNS.get(key)
    if hit is not None and hit[0]() is inv_freq and hit[1] == version and hit[2] == device:
        return hit[3]
    turns = (inv_freq.to(device=device, dtype=torch.float64) / (2 * math.pi)).contiguous()
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return turns
    for old_key, entry in list(_TURNS.items()):  # entries of tensors that are gone
        if entry[0]() is None:
            del _TURNS[old_key]
    if hit is not None and hit[0]() is inv_freq:
        _RETIRED.append(hit[3])
    _TURNS[key] = (weakref.ref(inv_freq), version, device, turns)
    return turns
