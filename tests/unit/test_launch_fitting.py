"""``kernels._triton_support.launch_fitting``: a launch that a GPU's shared memory cannot hold at the tuned pipeline
depth is made again one stage shallower, and the depth that fitted is kept. No GPU needed: a stand-in kernel raises
Triton's own error the way a compiled kernel does at its first launch on a GPU with less shared memory per block."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ltri_rag.kernels import _triton_support as support
from triton.runtime.errors import OutOfResources


class SmallGpuKernel:
    """``kernel[grid](*args, **kwargs)``: records each launch's ``num_stages``; a depth above ``fits`` needs more
    shared memory than the block has."""

    def __init__(self, fits: int, resource: str = "shared memory") -> None:
        self.fits, self.resource, self.launches = fits, resource, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            stages = kwargs.get("num_stages", 3)
            self.launches.append(stages)
            if stages > self.fits:
                raise OutOfResources(2048 * stages, 2048 * self.fits, self.resource)
            return ("ran", grid, stages)
        return launch


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(support, "_SHALLOWER", {})


def test_a_launch_that_fits_is_made_once() -> None:
    kernel = SmallGpuKernel(fits=4)
    assert support.launch_fitting(kernel, (2,), torch.zeros(3), 7, BLOCK=64, num_stages=3) == ("ran", (2,), 3)
    assert kernel.launches == [3] and support._SHALLOWER == {}


def test_too_deep_a_pipeline_goes_one_stage_shallower_and_is_remembered(caplog) -> None:
    kernel = SmallGpuKernel(fits=1)
    x = torch.zeros(3, dtype=torch.bfloat16)
    with caplog.at_level("INFO", logger="ltri_rag"):
        assert support.launch_fitting(kernel, (2,), x, 7, BLOCK=64, num_stages=3) == ("ran", (2,), 1)
    assert kernel.launches == [3, 2, 1]
    assert "SmallGpuKernel: 3 pipeline stages do not fit this GPU's shared memory per block; launched with 1" in \
        caplog.text
    kernel.launches.clear()  # the same kernel and settings: straight to the depth that fitted
    assert support.launch_fitting(kernel, (5,), x, 9, BLOCK=64, num_stages=3) == ("ran", (5,), 1)
    assert kernel.launches == [1]
    kernel.launches.clear()  # other compile-time settings or dtypes are their own launches
    support.launch_fitting(kernel, (2,), x, 7, BLOCK=32, num_stages=3)
    support.launch_fitting(kernel, (2,), x.float(), 7, BLOCK=64, num_stages=3)
    assert kernel.launches == [3, 2, 1, 3, 2, 1]
    other = SmallGpuKernel(fits=2)  # another kernel that fits at its depth: one launch
    assert support.launch_fitting(other, (1,), x, num_stages=2) == ("ran", (1,), 2) and other.launches == [2]


def test_what_fewer_stages_cannot_fix_is_raised() -> None:
    with pytest.raises(OutOfResources, match="threads"):
        support.launch_fitting(SmallGpuKernel(fits=1, resource="threads"), (1,), torch.zeros(1), num_stages=3)
    with pytest.raises(OutOfResources, match="shared memory"):  # not even one stage fits
        support.launch_fitting(SmallGpuKernel(fits=0), (1,), torch.zeros(1), num_stages=3)
    kernel = SmallGpuKernel(fits=0)
    with pytest.raises(OutOfResources):
        support.launch_fitting(kernel, (1,), torch.zeros(1), num_stages=1)
    assert kernel.launches == [1]

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise ValueError("bad argument 3")
            return launch

    with pytest.raises(ValueError, match="bad argument 3"):
        support.launch_fitting(Broken(), (1,), torch.zeros(1), num_stages=3)
