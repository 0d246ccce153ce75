"""Cross-layer evidence: layers vote on which evicted tokens matter, and every layer sees the votes.

Each layer votes for the spans it would load on its own evidence; a vote covers every token of the span, so
votes are comparable between layers although each layer cuts its own spans. The fraction of layers voting for
each pool *slot* becomes the *prior* of the next step (or of the real pass, after a look-ahead pass over the same
chunk), and each layer reads it back as the mean vote over each of its own spans. A needle that only some layers
find on their own is then loaded by all of them.
"""

from __future__ import annotations

import torch

from ltri_rag.kernels.transfer import to_device
from ltri_rag.kernels.triton_consensus import prior_and_deposit
from ltri_rag.kernels.triton_consensus import triton_available as _kernel_available

__all__ = ["LayerConsensus"]

FUSED_CONSENSUS = True
"""Whether a layer selecting on CUDA reads its span prior in one Triton launch and deposits its votes in another
(:func:`ltri_rag.kernels.triton_consensus.prior_and_deposit`, the same values bit for bit) instead of eleven torch
operations (:meth:`LayerConsensus.span_prior` and :meth:`LayerConsensus.deposit`); False keeps the torch path (for
comparisons)."""


def _fused(device: torch.device) -> bool:
    """Whether :meth:`LayerConsensus.read` and :meth:`LayerConsensus.vote` take their one-launch paths on
    ``device``."""
    return FUSED_CONSENSUS and device.type == "cuda" and _kernel_available()


class LayerConsensus:
    """Slot-level evidence of one batch, per sequence, kept where the layers' votes are (the host, or the compute
    device when selection runs there: then nothing is read back).

    Each deposit is O(spans): a vote adds +1 at its span's first slot and -1 past its last to a difference array;
    the commit turns the sum into per-slot vote fractions once per step (O(slots)), and keeps their running sum,
    so each layer's :meth:`span_prior` is again O(spans).

    Args:
        batch_size: Number of sequences.
    """

    def __init__(self, batch_size: int) -> None:
        self.prior: list[torch.Tensor | None] = [None] * batch_size  # [num_slots] float32, where the votes were
        self._acc: list[torch.Tensor | None] = [None] * batch_size  # [num_slots + 1] float64 differences
        self._count = [0] * batch_size
        self._sums: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * batch_size  # (prior, its cumsum)

    def _prior_sums(self, seq: int, prior: torch.Tensor) -> torch.Tensor:
        """``[num_slots + 1]`` float64 running sum of ``prior`` (cached for the prior it was made from; ``prior``
        may be assigned from outside, e.g. restored after a look-ahead)."""
        cached = self._sums[seq]
        if cached is None or cached[0] is not prior:
            sums = torch.zeros(prior.numel() + 1, dtype=torch.float64, device=prior.device)
            torch.cumsum(prior.to(torch.float64), 0, out=sums[1:])
            cached = self._sums[seq] = (prior, sums)
        return cached[1]

    def prior_on(self, seq: int, device: torch.device) -> torch.Tensor | None:
        """The prior of ``seq`` moved to ``device`` (and kept there), or None without evidence."""
        prior = self.prior[seq]
        if prior is not None and prior.device != torch.device(device):
            prior = self.prior[seq] = prior.to(device)
        return prior

    def pad_prior(self, seq: int, size: int) -> None:
        """Extend the prior of ``seq`` with zero votes to ``size`` slots (slots it does not cover read as 0 votes
        anyway, so every :meth:`span_prior` stays the same, bit for bit); a prior that large already, or none, is
        kept."""
        prior = self.prior[seq]
        if prior is not None and prior.numel() < size:
            grown = torch.zeros(size, dtype=prior.dtype, device=prior.device)
            grown[: prior.numel()] = prior
            self.prior[seq] = grown

    def forget_sums(self) -> None:
        """Drop the cached running sums of the priors (a CUDA graph being captured must compute them itself: the
        prior it reads is refilled in place before every replay)."""
        self._sums = [None] * len(self._sums)

    def span_prior(self, seq: int, lengths: torch.Tensor, device: torch.device | None = None,
                   geometry: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Mean prior vote over each span of a partition of slots ``[0, lengths.sum())``, or None without evidence.

        Args:
            seq: Sequence index.
            lengths: ``[num_spans]`` span lengths, in slot order, starting at slot 0 (best on the host).
            device: Where the result is wanted (default: the host); the prior moves there once if it lives
                elsewhere.
            geometry: The lengths and partition bounds already on ``device``
                (:meth:`~ltri_rag.span_memory.SpanTable.geometry_on`): then nothing is copied from the host.

        Returns:
            ``[num_spans]`` float32 on ``device``, in [0, 1]; slots the prior does not cover read as 0.
        """
        prior = self.prior[seq]
        if prior is None or lengths.numel() == 0:
            return None
        device = torch.device("cpu") if device is None else torch.device(device)
        prior = self.prior_on(seq, device)
        sums = self._prior_sums(seq, prior)
        last = sums.numel() - 1
        if geometry is not None:
            lengths_on, bounds = geometry
            bounds = bounds.clamp(max=last)
        else:
            lengths = lengths.to("cpu", torch.int64)
            ends = torch.cumsum(lengths, 0)
            bounds = to_device(torch.stack([ends.clamp(max=last), (ends - lengths).clamp(max=last)]), device)
            lengths_on = to_device(lengths, device)
        inside = sums[bounds[0]] - sums[bounds[1]]
        return (inside / lengths_on).to(torch.float32)

    def read(self, seq: int, lengths: torch.Tensor, device: torch.device,
             geometry: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """:meth:`span_prior` on ``device``: the same values, on CUDA with ``geometry`` (``FUSED_CONSENSUS``) in one
        launch. A layer reads the prior before it selects (its selection with the prior and the one it votes
        with are made together: :func:`ltri_rag.retrieval.select_spans_pair`), then votes (:meth:`vote`)."""
        device = torch.device(device)
        if geometry is None or not _fused(device):
            return self.span_prior(seq, lengths, device=device, geometry=geometry)
        prior = self.prior_on(seq, device) if lengths.numel() else None
        if prior is None:
            return None
        lengths_on, bounds = geometry
        return prior_and_deposit(None, bounds[1], bounds[0], lengths_on, self._prior_sums(seq, prior), None)

    def vote(self, seq: int, lengths: torch.Tensor, selected: torch.Tensor,
             geometry: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """:meth:`deposit` of ``selected.any(dim=0)`` (``selected``: ``[rows, num_spans]`` bool, a layer's selection
        without the prior): the same evidence, on CUDA with ``geometry`` (``FUSED_CONSENSUS``) in one launch.
        ``seq``, ``lengths``, ``geometry``: as for :meth:`span_prior`."""
        if geometry is None or not _fused(selected.device):
            self.deposit(seq, lengths, selected.any(dim=0), geometry=geometry)
            return
        acc = self._grown_acc(seq, lengths, selected.device)
        lengths_on, bounds = geometry
        prior_and_deposit(selected, bounds[1], bounds[0], lengths_on, None, acc)
        self._acc[seq] = acc
        self._count[seq] += 1

    def _grown_acc(self, seq: int, lengths: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The difference array of ``seq`` on ``device``, grown (zeros) to cover spans of ``lengths`` (host)."""
        total = int(lengths.to("cpu", torch.int64).sum()) if lengths.numel() else 0
        acc = self._acc[seq]
        if acc is not None and acc.device != device:
            acc = acc.to(device)
        if acc is None or acc.numel() < total + 1:
            grown = torch.zeros(total + 1, dtype=torch.float64, device=device)
            if acc is not None:
                grown[: acc.numel()] = acc
            acc = grown
        return acc

    def deposit(self, seq: int, lengths: torch.Tensor, votes: torch.Tensor,
                geometry: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add one layer's votes ``[num_spans]`` (1 = it would load the span) over spans of the given lengths
        (``[num_spans]``, in slot order from slot 0, best on the host). The evidence is kept on ``votes``' device.
        ``geometry``: as in :meth:`span_prior` (then the bounds are not copied from the host)."""
        lengths = lengths.to("cpu", torch.int64)
        device = votes.device
        weight = votes.to(torch.float64)
        ends = torch.cumsum(lengths, 0)
        acc = self._grown_acc(seq, lengths, device)
        if geometry is not None:
            starts_on, ends_on = geometry[1][1], geometry[1][0]
        else:
            starts_on, ends_on = to_device(ends - lengths, device), to_device(ends, device)
        acc.index_add_(0, starts_on, weight)
        acc.index_add_(0, ends_on, -weight)
        self._acc[seq] = acc
        self._count[seq] += 1

    def commit(self) -> None:
        """Make the evidence gathered since the last commit the prior (sequences without new evidence keep theirs)."""
        for seq, acc in enumerate(self._acc):
            if acc is not None and self._count[seq]:
                self.prior[seq] = (torch.cumsum(acc[:-1], 0) / self._count[seq]).to(torch.float32)
        self._acc = [None] * len(self._acc)
        self._count = [0] * len(self._count)

    def effects(self) -> tuple:
        """The evidence gathered since the last commit (what a replayed CUDA graph of a step leaves: see
        :meth:`restore_effects`)."""
        return list(self._acc), list(self._count)

    def restore_effects(self, effects: tuple) -> None:
        """Take ``effects`` (:meth:`effects` of a captured step, whose tensors a replay has refilled) as the
        evidence gathered since the last commit."""
        acc, count = effects
        self._acc, self._count = list(acc), list(count)

    def discard(self) -> None:
        """Drop the evidence gathered since the last commit (the pass that gathered it failed)."""
        self._acc = [None] * len(self._acc)
        self._count = [0] * len(self._count)
