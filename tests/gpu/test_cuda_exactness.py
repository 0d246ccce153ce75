"""On CUDA: the engine equals the unmodified model (float32) and stays close in bfloat16. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriSession
from tests.unit.test_exactness import _ids, exact_config
from tests.unit.tiny_models import FAMILIES, reference_logits, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


# the span pool: all in pinned host memory, all on the GPU, the default (GPU up to a share of free memory: all of
# it here), and a GPU tier of a few pages with the rest spilled to the host (retrievals gather from both tiers)
POOLS = {"host": {"kv_offload": True}, "gpu": {"kv_offload": False}, "auto": {},
         "auto_split": {"kv_offload": "auto", "kv_device_gib": 3e-6}}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["infllm", "ltri"])
@pytest.mark.parametrize("pool", list(POOLS))
def test_cuda_prefill_equals_full_attention(family: str, mode: str, pool: str) -> None:
    model = tiny_model(family).cuda()
    ids = _ids(2, 97).cuda()
    ref = reference_logits(model, ids)
    session = LtriSession(model, exact_config(mode, 9, **POOLS[pool]), batch_size=2)
    out = session.feed(ids, return_all_logits=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    pool_obj = session.cache.pool
    if pool == "auto_split":  # both tiers really in use
        assert 0 < pool_obj.pages_on_device < pool_obj.num_pages
    elif pool in ("gpu", "auto"):
        assert pool_obj.pages_on_device == pool_obj.num_pages > 0
    else:
        assert pool_obj.pages_on_device == 0


def test_cuda_bfloat16_close() -> None:
    model = tiny_model("qwen2").cuda().to(torch.bfloat16)
    ids = _ids(1, 90).cuda()
    ref = reference_logits(model, ids).float()
    out = LtriSession(model, exact_config("ltri", 8)).feed(ids, return_all_logits=True).float()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
