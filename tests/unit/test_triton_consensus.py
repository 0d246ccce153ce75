"""The one-launch consensus read and vote (``kernels.triton_consensus.prior_and_deposit``: both in one launch, or
either alone) equals the torch path (``LayerConsensus.span_prior`` then ``deposit``) bit for bit: span priors, the
difference array, over several layers, steps and commits, priors shorter than the slots, spans that fill more than
one program, several selection rows. On CPU under ``TRITON_INTERPRET`` (set here, before the kernel module is
imported); compiled on a GPU."""

import pytest
import torch

from tests.unit.triton_modules import DEVICE, kernel_module

triton_consensus = kernel_module("triton_consensus")

from ltri_rag import consensus as consensus_module
from ltri_rag.consensus import LayerConsensus


def _geometry(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lengths, bounds)`` on the test device, as ``SpanTable.geometry_on`` lays them out."""
    ends = torch.cumsum(lengths, 0)
    return lengths.to(DEVICE), torch.stack([ends, ends - lengths]).to(DEVICE)


def _lengths(num_spans: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 10, (num_spans,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_spans,rows", [(0, 1), (1, 1), (7, 2), (1500, 1), (2100, 3)])
def test_kernel_matches_the_torch_read_and_deposit(num_spans: int, rows: int) -> None:
    lengths = _lengths(num_spans, seed=num_spans)
    lengths_on, bounds = _geometry(lengths)
    total = int(lengths.sum())
    gen = torch.Generator().manual_seed(1)
    # a prior shorter than the slots (later spans read it clamped) with fractional votes, and evidence already
    # deposited by earlier layers
    prior = (torch.randint(0, 5, (max(total // 2, 1),), generator=gen).float() / 4).to(DEVICE)
    acc0 = torch.randint(-3, 4, (total + 1,), generator=gen).to(torch.float64).to(DEVICE)
    selected = (torch.rand(rows, num_spans, generator=gen) < 0.2).to(DEVICE)
    ref = LayerConsensus(1)
    ref.prior[0] = prior
    ref._acc[0] = acc0.clone()
    want = ref.span_prior(0, lengths, device=DEVICE, geometry=(lengths_on, bounds))
    ref.deposit(0, lengths, selected.any(dim=0), geometry=(lengths_on, bounds))
    sums = ref._prior_sums(0, prior)
    acc = acc0.clone()
    got = triton_consensus.prior_and_deposit(selected, bounds[1], bounds[0], lengths_on, sums, acc)
    if num_spans:
        assert torch.equal(got, want)
    assert torch.equal(acc, ref._acc[0])
    acc = acc0.clone()  # no prior yet: the deposit alone
    assert triton_consensus.prior_and_deposit(selected, bounds[1], bounds[0], lengths_on, None, acc) is None
    assert torch.equal(acc, ref._acc[0])
    # the prior alone (read before the layer has selected)
    got = triton_consensus.prior_and_deposit(None, bounds[1], bounds[0], lengths_on, sums, None)
    if num_spans:
        assert torch.equal(got, want)


def test_read_then_vote_over_layers_and_steps(monkeypatch) -> None:
    """Two consensus objects, one on the torch path and one on the kernel, fed the same selections by 4 layers over
    5 steps (spans appended between steps, commits in between) hold the same priors and evidence throughout."""
    fused, torch_path = LayerConsensus(2), LayerConsensus(2)
    use_kernel = {"on": False}
    monkeypatch.setattr(consensus_module, "_fused", lambda device: use_kernel["on"])
    gen = torch.Generator().manual_seed(5)
    for step in range(5):
        for seq in range(2):
            lengths = _lengths(30 + 20 * step + seq, seed=10 * step + seq)
            geometry = _geometry(lengths)
            for _ in range(4):
                selected = (torch.rand(1 + seq, len(lengths), generator=gen) < 0.3).to(DEVICE)
                use_kernel["on"] = True
                got = fused.read(seq, lengths, DEVICE, geometry=geometry)
                fused.vote(seq, lengths, selected, geometry=geometry)
                use_kernel["on"] = False
                want = torch_path.read(seq, lengths, DEVICE, geometry=geometry)
                torch_path.vote(seq, lengths, selected, geometry=geometry)
                assert (got is None) == (want is None) == (step == 0)
                if want is not None:
                    assert torch.equal(got, want)
                assert torch.equal(fused._acc[seq], torch_path._acc[seq])
        fused.commit()
        torch_path.commit()
        for seq in range(2):
            assert torch.equal(fused.prior[seq], torch_path.prior[seq])


def test_bad_inputs_raise() -> None:
    lengths_on, bounds = _geometry(torch.tensor([2, 3]))
    acc = torch.zeros(6, dtype=torch.float64, device=DEVICE)
    selected = torch.ones(1, 2, dtype=torch.bool, device=DEVICE)
    fn = triton_consensus.prior_and_deposit
    with pytest.raises(ValueError, match="selected must be a \\[R, S\\] bool tensor"):
        fn(selected.float(), bounds[1], bounds[0], lengths_on, None, acc)
    with pytest.raises(ValueError, match="starts must be \\[2\\] int64"):
        fn(selected, bounds[1].int(), bounds[0], lengths_on, None, acc)
    with pytest.raises(ValueError, match="acc and sums must be one-dimensional float64"):
        fn(selected, bounds[1], bounds[0], lengths_on, None, acc.float())
    with pytest.raises(ValueError, match="pass selected and acc together"):
        fn(selected, bounds[1], bounds[0], lengths_on, None, None)
    with pytest.raises(ValueError, match="pass selected and acc together"):
        fn(None, bounds[1], bounds[0], lengths_on, None, None)
