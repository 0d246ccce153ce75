"""Cross-layer consensus of one layer's selection in one launch: its span prior read and its votes deposited.

A layer selecting spans on the device (:class:`ltri_rag.consensus.LayerConsensus`) reads the prior, the mean vote of
the previous step over each of its spans, and deposits its own votes (a span counts as voted when any selection row
takes it) into a difference array over pool slots. In torch that is eleven small launches per layer and selection
(two gathers of the prior's running sum, a subtraction, a division, a cast; a reduction over the rows, a cast, two
``index_add_`` and a negation), about 2 µs each plus the gaps between them in a decode step's CUDA graph: some 350
launches per step of a 32-layer model. :func:`prior_and_deposit` does both in one launch, one program per
``BLOCK`` spans:

* ``prior[i] = (sums[min(end_i, last)] - sums[min(start_i, last)]) / length_i`` in float64 (IEEE division, rounded to
  nearest), cast to float32: the reference's operations, so the same bits;
* a span taken by any row adds ``+1`` to ``acc[start_i]`` and ``-1`` to ``acc[end_i]`` with float64 atomic adds.
  The array holds integer counts, which float64 adds exactly in any order, so the result is the reference's
  (two ``index_add_``), bit for bit, and the same from run to run.

Shapes:
    selected: ``[R, S]`` bool, the layer's selection rows (1, or one per KV head), or None (no deposit);
    starts / ends / lengths: ``[S]`` int64, each span's first slot, the slot past its last, its length (>= 1);
    sums: ``[last + 1]`` float64, the running sum of the prior (``sums[0] = 0``), or None (no prior yet);
    acc: ``[T]`` float64 with ``T > max(ends)``, updated in place (None with ``selected``);
    returns ``[S]`` float32 prior per span, or None without ``sums``.
"""

from __future__ import annotations

import torch
from ltri_rag.kernels._triton_support import interpreted, tl, triton, triton_available

__all__ = ["prior_and_deposit", "triton_available"]

INTERPRETED = interpreted()
_BLOCK = 1024

if triton is not None:

    @triton.jit(do_not_specialize=("num_spans", "rows", "last", "row_stride"))
    def _prior_deposit_kernel(Selected, Starts, Ends, Lengths, Sums, Acc, Prior, num_spans, rows, row_stride, last,
                              HAS_PRIOR: tl.constexpr, DEPOSIT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < num_spans
        start = tl.load(Starts + i, mask=ok, other=0)
        end = tl.load(Ends + i, mask=ok, other=0)
        if HAS_PRIOR:
            length = tl.load(Lengths + i, mask=ok, other=1)
            hi = tl.load(Sums + tl.minimum(end, last), mask=ok, other=0.0)
            lo = tl.load(Sums + tl.minimum(start, last), mask=ok, other=0.0)
            prior = (hi - lo) / length.to(tl.float64)  # float64 division: rounded to nearest (div.rn.f64)
            tl.store(Prior + i, prior.to(tl.float32), mask=ok)
        if DEPOSIT:
            vote = tl.full([BLOCK], 0, dtype=tl.int32)
            for r in range(rows):
                vote = vote | tl.load(Selected + r * row_stride + i, mask=ok, other=0).to(tl.int32)
            voted = ok & (vote != 0)
            tl.atomic_add(Acc + start, tl.full([BLOCK], 1.0, dtype=tl.float64), mask=voted)
            tl.atomic_add(Acc + end, tl.full([BLOCK], -1.0, dtype=tl.float64), mask=voted)


def prior_and_deposit(selected: torch.Tensor | None, starts: torch.Tensor, ends: torch.Tensor,
                      lengths: torch.Tensor, sums: torch.Tensor | None,
                      acc: torch.Tensor | None) -> torch.Tensor | None:
    """The span prior from ``sums`` and the deposit of ``selected``'s votes into ``acc``, in one launch (module
    docstring). No host synchronisation: a CUDA graph can capture it. Either half may be left out: ``sums`` None
    deposits only (and returns None); ``selected`` and ``acc`` None reads only the prior (a layer whose two
    selections are made together reads the prior before it has votes to deposit).

    Raises:
        RuntimeError: triton is not installed.
        ValueError: shapes, dtypes or devices that do not match, or tensors the kernel cannot run on.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if (selected is None) != (acc is None) or (selected is None and sums is None):
        raise ValueError("pass selected and acc together (a deposit), sums (a prior read), or all three")
    if selected is not None and (selected.dim() != 2 or selected.dtype != torch.bool):
        raise ValueError(f"selected must be a [R, S] bool tensor, got {tuple(selected.shape)} {selected.dtype}")
    num_spans = selected.shape[1] if selected is not None else lengths.shape[0]
    for name, t in (("starts", starts), ("ends", ends), ("lengths", lengths)):
        if t.shape != (num_spans,) or t.dtype != torch.int64:
            raise ValueError(f"{name} must be [{num_spans}] int64, got {tuple(t.shape)} {t.dtype}")
    arrays = [t for t in (acc, sums) if t is not None]
    if any(t.dim() != 1 or t.dtype != torch.float64 for t in arrays):
        raise ValueError("acc and sums must be one-dimensional float64 tensors")
    device = arrays[0].device
    tensors = [t for t in (selected, starts, ends, lengths) if t is not None] + arrays
    if any(t.device != device for t in tensors):
        raise ValueError(f"every tensor must be on {device}")
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the kernel needs CUDA tensors (got {device}), or TRITON_INTERPRET=1 set before "
                         "ltri_rag.kernels.triton_consensus is imported")
    prior = torch.empty(num_spans, dtype=torch.float32, device=device) if sums is not None else None
    if num_spans == 0:
        return prior
    starts, ends, lengths = starts.contiguous(), ends.contiguous(), lengths.contiguous()
    any_array = arrays[0]  # the pointer of an unused argument
    sel = selected.contiguous().view(torch.int8) if selected is not None else any_array
    _prior_deposit_kernel[(triton.cdiv(num_spans, _BLOCK),)](
        sel, starts, ends, lengths, sums if sums is not None else any_array,
        acc if acc is not None else any_array, prior if prior is not None else any_array, num_spans,
        selected.shape[0] if selected is not None else 0, selected.stride(0) if selected is not None else 0,
        (sums.numel() - 1) if sums is not None else 0, HAS_PRIOR=sums is not None, DEPOSIT=selected is not None,
        BLOCK=_BLOCK)
    return prior
