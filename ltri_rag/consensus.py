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

__all__ = ["LayerConsensus"]


class LayerConsensus:
    """Slot-level evidence of one batch, per sequence.

    Args:
        batch_size: Number of sequences.
    """

    def __init__(self, batch_size: int) -> None:
        self.prior: list[torch.Tensor | None] = [None] * batch_size  # [num_slots] sums to 1
        self._acc: list[torch.Tensor | None] = [None] * batch_size
        self._count = [0] * batch_size

    def span_prior(self, seq: int, lengths: torch.Tensor) -> torch.Tensor | None:
        """Mean prior vote over each span of a partition of slots ``[0, lengths.sum())``, or None without evidence.

        Args:
            seq: Sequence index.
            lengths: ``[num_spans]`` span lengths, in slot order, starting at slot 0 (best on the host: their sum
                sizes the result without a device sync).

        Returns:
            ``[num_spans]`` float32 on the prior's device, in [0, 1].
        """
        prior = self.prior[seq]
        if prior is None or lengths.numel() == 0:
            return None
        total = int(lengths.sum())  # span tables keep lengths on the host: no device sync here
        cs = torch.zeros(total + 1, device=prior.device)
        n = min(total, prior.numel())
        cs[1:n + 1] = torch.cumsum(prior[:n], 0)
        cs[n + 1:] = cs[n]
        ends = to_device(torch.cumsum(lengths, 0), prior.device)  # (integer sums: the same on any device)
        lengths = to_device(lengths, prior.device)
        return (cs[ends] - cs[ends - lengths]) / lengths

    def deposit(self, seq: int, lengths: torch.Tensor, votes: torch.Tensor) -> None:
        """Add one layer's votes ``[num_spans]`` (1 = it would load the span) over spans of the given lengths
        (``[num_spans]``, best on the host: the number of slots is read from them)."""
        # the output size from the (host) lengths: repeat_interleave does not read it back from the device
        density = torch.repeat_interleave(votes.float(), to_device(lengths, votes.device),
                                          output_size=int(lengths.sum()))
        acc = self._acc[seq]
        if acc is None or acc.numel() < density.numel():
            grown = torch.zeros(density.numel(), device=votes.device)
            if acc is not None:
                grown[: acc.numel()] = acc
            acc = grown
        acc[: density.numel()] += density
        self._acc[seq] = acc
        self._count[seq] += 1

    def commit(self) -> None:
        """Make the evidence gathered since the last commit the prior (sequences without new evidence keep theirs)."""
        for seq, acc in enumerate(self._acc):
            if acc is not None and self._count[seq]:
                self.prior[seq] = acc / self._count[seq]
        self._acc = [None] * len(self._acc)
        self._count = [0] * len(self._count)

    def discard(self) -> None:
        """Drop the evidence gathered since the last commit (the pass that gathered it failed)."""
        self._acc = [None] * len(self._acc)
        self._count = [0] * len(self._count)
