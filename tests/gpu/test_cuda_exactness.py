"""On CUDA: the engine equals the unmodified model (float32) and stays close in bfloat16. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriSession
from tests.unit.test_exactness import _ids, exact_config
from tests.unit.tiny_models import FAMILIES, reference_logits, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["infllm", "ltri"])
@pytest.mark.parametrize("kv_offload", [True, False])
def test_cuda_prefill_equals_full_attention(family: str, mode: str, kv_offload: bool) -> None:
    model = tiny_model(family).cuda()
    ids = _ids(2, 97).cuda()
    ref = reference_logits(model, ids)
    out = LtriSession(model, exact_config(mode, 9, kv_offload=kv_offload), batch_size=2).feed(
        ids, return_all_logits=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_cuda_bfloat16_close() -> None:
    model = tiny_model("qwen2").cuda().to(torch.bfloat16)
    ids = _ids(1, 90).cuda()
    ref = reference_logits(model, ids).float()
    out = LtriSession(model, exact_config("ltri", 8)).feed(ids, return_all_logits=True).float()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
