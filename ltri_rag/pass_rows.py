"""What every layer of a pass needs from the pass alone, made once per pass (``StepPlan.shared``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ltri_rag.config import LtriConfig
from ltri_rag.kernels.transfer import to_device
from ltri_rag.retrieval import scored_queries

if TYPE_CHECKING:
    from ltri_rag.layer import StepPlan

__all__ = ["scored_rows"]


def scored_rows(device: torch.device, plan: StepPlan, config: LtriConfig,
                position: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(picks, back)`` of a pass: the indices of its queries that span scoring reads (on ``device``; None: every
    query, see :func:`~ltri_rag.retrieval.scored_queries`) and the shifts that take those queries back to position
    0 (minus their positions, on ``device``).

    Equal for every layer of a pass, so the first layer makes them and keeps them in ``plan.shared``: each would
    otherwise be a pinned host-to-device copy per layer. ``position``: ``[1]`` int64 on ``device`` holding
    ``plan.pos0`` (a graph-form step, whose positions are read from the device: nothing is kept then).
    """
    key = ("scored_rows", torch.device(device))
    if position is None and key in plan.shared:
        return plan.shared[key]
    picks = scored_queries(plan.q_len, config)  # [c] host, or None: every query
    if position is None:
        q_pos = torch.arange(plan.pos0, plan.pos0 + plan.q_len)
    elif plan.q_len == 1:  # a decoded token: its position as it is (no arange and addition to launch)
        q_pos = position.reshape(1)
    else:
        q_pos = position.reshape(1) + torch.arange(plan.q_len, device=position.device)
    if picks is not None:
        q_pos = q_pos[picks]
        picks = to_device(picks, device)
    rows = (picks, to_device(-q_pos, device))
    if position is None:
        plan.shared[key] = rows
    return rows
