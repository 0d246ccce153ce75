"""The rotating kernels' turns per position (``kernels._triton_support.turns_per_position``): made once per inverse
frequency tensor and device, the same values as computing them each time, made again after an in-place change or
for another tensor, and nothing kept for tensors that are gone."""

from __future__ import annotations

import gc
import math

import torch

from ltri_rag.kernels import _triton_support as support


def test_turns_are_made_once_and_follow_changes() -> None:
    inv_freq = 1.0 / 500000 ** (torch.arange(64, dtype=torch.float32) / 64)
    first = support.turns_per_position(inv_freq, "cpu")
    assert first.dtype == torch.float64 and first.is_contiguous()
    assert torch.equal(first, inv_freq.double() / (2 * math.pi))
    assert support.turns_per_position(inv_freq, torch.device("cpu")) is first  # cached
    inv_freq.mul_(0.5)  # an in-place change: made again, with the new values
    again = support.turns_per_position(inv_freq, "cpu")
    assert again is not first and torch.equal(again, inv_freq.double() / (2 * math.pi))
    assert any(t is first for t in support._RETIRED)  # the old one stays alive (a captured graph may read it)
    other = inv_freq.clone()  # equal values, another tensor: its own entry
    assert support.turns_per_position(other, "cpu") is not again
    key = id(other)
    del other
    gc.collect()
    support.turns_per_position(torch.ones(3), "cpu")  # an insertion drops the entries of tensors that are gone
    assert key not in support._TURNS or support._TURNS[key][0]() is not None


def test_inference_tensors_are_cached_too() -> None:
    """A tensor made under ``torch.inference_mode`` has no version counter: its turns are made once all the same."""
    with torch.inference_mode():
        inv_freq = torch.rand(8)
    first = support.turns_per_position(inv_freq, "cpu")
    assert support.turns_per_position(inv_freq, "cpu") is first
    assert torch.equal(first, inv_freq.double() / (2 * math.pi))
