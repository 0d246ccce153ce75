"""Cross-layer evidence (``LayerConsensus``) against hand computations."""

from __future__ import annotations

import torch

from ltri_rag.consensus import LayerConsensus


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _L(*lengths: int) -> torch.Tensor:
    return torch.tensor(lengths, dtype=torch.int64)


def _close(actual: torch.Tensor | None, expected: list[float]) -> None:
    assert actual is not None
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_no_evidence_is_none() -> None:
    c = LayerConsensus(2)
    assert c.span_prior(0, _L(2, 3)) is None
    assert c.span_prior(1, _L(4)) is None
    c.commit()  # committing nothing changes nothing
    assert c.prior == [None, None]
    assert c.span_prior(0, _L(2, 3)) is None


def test_deposit_is_invisible_until_commit() -> None:
    c = LayerConsensus(1)
    c.deposit(0, _L(2, 2), _t(1, 0))
    assert c.span_prior(0, _L(2, 2)) is None
    c.commit()
    _close(c.span_prior(0, _L(2, 2)), [1.0, 0.0])


def test_two_layers_with_different_boundaries() -> None:
    """Layer A cuts slots 0..5 as [2, 3, 1], layer B as [3, 3]; votes spread over tokens, averaged over layers."""
    c = LayerConsensus(1)
    c.deposit(0, _L(2, 3, 1), _t(1, 0, 1))  # slots: 1 1 0 0 0 1
    c.deposit(0, _L(3, 3), _t(0, 1))  # slots: 0 0 0 1 1 1
    c.commit()
    slot_prior = [0.5, 0.5, 0.0, 0.5, 0.5, 1.0]
    _close(c.prior[0], slot_prior)
    # read back through each layer's own partition, and through others
    _close(c.span_prior(0, _L(2, 3, 1)), [0.5, (0.0 + 0.5 + 0.5) / 3, 1.0])
    _close(c.span_prior(0, _L(3, 3)), [1.0 / 3, 2.0 / 3])
    _close(c.span_prior(0, _L(6)), [0.5])
    _close(c.span_prior(0, _L(1, 1, 1, 1, 1, 1)), slot_prior)
    _close(c.span_prior(0, _L(1, 4, 1)), [0.5, 1.5 / 4, 1.0])


def test_bool_votes_and_dtype() -> None:
    c = LayerConsensus(1)
    c.deposit(0, _L(3, 1, 2), torch.tensor([True, False, True]))
    c.commit()
    prior = c.span_prior(0, _L(2, 4))
    assert prior is not None and prior.dtype == torch.float32 and prior.shape == (2,)
    _close(prior, [1.0, 0.75])  # slots 1 1 1 0 1 1


def test_partition_longer_than_prior_gives_zero_to_new_slots() -> None:
    """Slots evicted after the prior was made have no evidence: they read as zero votes."""
    c = LayerConsensus(1)
    c.deposit(0, _L(2, 3, 1), _t(1, 0, 1))
    c.deposit(0, _L(3, 3), _t(0, 1))
    c.commit()  # prior over 6 slots: .5 .5 0 .5 .5 1
    _close(c.span_prior(0, _L(4, 3, 2)), [(0.5 + 0.5 + 0.0 + 0.5) / 4, (0.5 + 1.0 + 0.0) / 3, 0.0])
    _close(c.span_prior(0, _L(6, 5)), [0.5, 0.0])
    # a partition covering fewer slots than the prior reads only its own slots
    _close(c.span_prior(0, _L(2, 1)), [0.5, 0.0])


def test_layers_covering_different_numbers_of_slots() -> None:
    """A layer whose partition is shorter counts as voting 0 for the slots it does not cover (either order)."""
    for order in ((0, 1), (1, 0)):
        c = LayerConsensus(1)
        deposits = [(_L(3), _t(1)), (_L(2, 4), _t(0, 1))]
        for i in order:
            c.deposit(0, *deposits[i])
        c.commit()
        _close(c.prior[0], [0.5, 0.5, 1.0, 0.5, 0.5, 0.5])


def test_empty_lengths_is_none() -> None:
    c = LayerConsensus(1)
    c.deposit(0, _L(2), _t(1))
    c.commit()
    assert c.span_prior(0, torch.zeros(0, dtype=torch.int64)) is None


def test_sequences_are_independent_and_commit_keeps_old_priors() -> None:
    c = LayerConsensus(3)
    c.deposit(0, _L(2, 2), _t(1, 0))
    c.deposit(1, _L(1, 3), _t(0, 1))
    c.deposit(1, _L(1, 3), _t(1, 1))
    c.commit()
    _close(c.span_prior(0, _L(2, 2)), [1.0, 0.0])
    _close(c.span_prior(1, _L(1, 3)), [0.5, 1.0])
    assert c.span_prior(2, _L(4)) is None
    # a step where only sequence 1 gets new votes: sequence 0 keeps its prior, sequence 2 still has none
    c.deposit(1, _L(2, 2), _t(0, 1))
    c.commit()
    _close(c.span_prior(0, _L(2, 2)), [1.0, 0.0])
    _close(c.span_prior(1, _L(2, 2)), [0.0, 1.0])  # replaced, not accumulated with the older votes
    assert c.span_prior(2, _L(4)) is None
    # a step with no votes at all keeps everything
    c.commit()
    _close(c.span_prior(0, _L(2, 2)), [1.0, 0.0])
    _close(c.span_prior(1, _L(2, 2)), [0.0, 1.0])


def test_evidence_is_reset_after_commit() -> None:
    c = LayerConsensus(1)
    for votes in (_t(1, 1), _t(1, 1), _t(1, 1)):
        c.deposit(0, _L(1, 1), votes)
    c.commit()
    _close(c.prior[0], [1.0, 1.0])
    c.deposit(0, _L(1, 1), _t(0, 1))
    c.commit()
    _close(c.prior[0], [0.0, 1.0])  # the count restarted at 1: not (3 + 0) / 4


def test_prior_values_stay_in_unit_interval() -> None:
    gen = torch.Generator().manual_seed(0)
    c = LayerConsensus(1)
    for _ in range(5):
        lengths = torch.randint(1, 6, (7,), generator=gen)
        c.deposit(0, lengths, torch.rand(7, generator=gen) > 0.5)
    c.commit()
    for _ in range(5):
        lengths = torch.randint(1, 9, (6,), generator=gen)
        prior = c.span_prior(0, lengths)
        assert prior is not None and prior.shape == lengths.shape
        assert bool(((prior >= 0) & (prior <= 1)).all())
        # the span mean times length sums to the prior mass over the covered slots
        covered = int(lengths.sum())
        slots = torch.zeros(covered)
        n = min(covered, c.prior[0].numel())
        slots[:n] = c.prior[0][:n]
        torch.testing.assert_close((prior * lengths).sum(), slots.sum(), atol=1e-5, rtol=0)


def test_a_prior_padded_with_zero_votes_gives_the_same_span_priors() -> None:
    """``pad_prior`` (what a captured retrieving step reads, at the size of the next commit) changes no span's
    prior, bit for bit, whether the spans end inside, across or past the old prior."""
    from ltri_rag.consensus import LayerConsensus

    gen = torch.Generator().manual_seed(5)
    consensus = LayerConsensus(1)
    consensus.prior[0] = torch.rand(37, generator=gen)
    lengths = torch.tensor([5, 9, 3, 12, 8, 7, 4])  # 48 slots: the last spans reach past the 37 covered
    before = consensus.span_prior(0, lengths)
    consensus.pad_prior(0, 48)
    assert consensus.prior[0].numel() == 48
    torch.testing.assert_close(consensus.span_prior(0, lengths), before, atol=0, rtol=0)
    kept = consensus.prior[0]
    consensus.pad_prior(0, 40)  # large enough already: kept
    assert consensus.prior[0] is kept
