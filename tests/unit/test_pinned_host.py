"""``pinned_empty``: exact-size page-locked host memory for the span pool's host tier (registered with CUDA, and
unregistered just before it is freed). Without a GPU the CUDA runtime is replaced by a recorder: what is checked is
the bookkeeping (page-aligned, whole pages, one registration per buffer, unregistered once, only when the last view
goes, a fallback when registration fails); the GPU tests read and write such pools in place."""

import gc
import mmap

import pytest
import torch

from ltri_rag import host_memory
from ltri_rag.pool import PagedKVPool


class FakeRuntime:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.registered: dict[int, int] = {}
        self.calls: list[tuple[str, int]] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 - the CUDA runtime's name
        self.calls.append(("register", ptr))
        if self.fail:
            return 712  # cudaErrorHostMemoryAlreadyRegistered, say
        assert flags == 3 and ptr % mmap.PAGESIZE == 0 and size % mmap.PAGESIZE == 0
        for start, length in self.registered.items():  # no two registrations share a page
            assert ptr + size <= start or start + length <= ptr
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.calls.append(("unregister", ptr))
        assert ptr in self.registered
        del self.registered[ptr]
        return 0


@pytest.fixture
def runtime(monkeypatch):
    fake = FakeRuntime()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


def test_exact_pages_registered_and_released_with_the_last_view(runtime) -> None:
    t = host_memory.pinned_empty((3, 5, 2, 7), torch.bfloat16)
    assert t.shape == (3, 5, 2, 7) and t.dtype == torch.bfloat16 and t.device.type == "cpu"
    assert t.data_ptr() % mmap.PAGESIZE == 0
    (ptr, size), = runtime.registered.items()
    assert ptr == t.data_ptr() and size == mmap.PAGESIZE  # 420 bytes: one whole page
    t.fill_(1.5)
    view = t[1:].view(-1)  # a view outlives the tensor: the memory stays registered
    del t
    gc.collect()
    assert runtime.registered and float(view.sum()) == 1.5 * view.numel()
    del view
    gc.collect()
    assert not runtime.registered and [c[0] for c in runtime.calls] == ["register", "unregister"]


def test_buffers_never_share_a_page(runtime) -> None:
    kept = [host_memory.pinned_empty((n, 64), torch.float32) for n in (1, 17, 16, 1000, 3)]
    assert len(runtime.registered) == len(kept)  # the fake refuses overlapping registrations
    big = host_memory.pinned_empty((1025, 1024), torch.float16)  # 2 MiB + 2 KiB: whole pages
    assert runtime.registered[big.data_ptr()] == -(-1025 * 2048 // mmap.PAGESIZE) * mmap.PAGESIZE
    del kept, big
    gc.collect()
    assert not runtime.registered


def test_fallbacks(runtime, monkeypatch) -> None:
    calls = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        calls.append(kwargs.get("pin_memory", False))
        return real_empty(*args, **{k: v for k, v in kwargs.items() if k != "pin_memory"})

    monkeypatch.setattr(torch, "empty", empty)
    runtime.fail = True  # registration refused: torch's pinned allocator
    assert host_memory.pinned_empty((4, 4), torch.float32).shape == (4, 4) and calls == [True]
    runtime.fail = False
    assert host_memory.pinned_empty((0, 4), torch.float32).numel() == 0 and calls == [True, True]  # nothing to lock
    monkeypatch.setattr(host_memory, "REGISTER_HOST_MEMORY", False)
    host_memory.pinned_empty((2, 2), torch.float32)
    assert calls == [True, True, True] and not runtime.registered


def test_pool_host_tier_uses_registered_pages(runtime) -> None:
    """A pinned host pool's pages come from pinned_empty: when the tier grows, the old pages are unregistered once
    nothing views them; what was written reads back the same."""
    pool = PagedKVPool(1, 4, torch.device("cpu"), pin_memory=True)
    first = pool.reserve(40)
    k = torch.randn(40, 2, 8)
    pool.write(0, 0, first, k, -k)
    assert len(runtime.registered) == 2  # layer 0's K and V
    sizes = sorted(runtime.registered.values())
    pool.reserve(400)  # the tier grows (doubling): new pages registered, the old ones released
    gc.collect()
    assert len(runtime.registered) == 2 and sorted(runtime.registered.values()) > sizes
    slots = torch.arange(40)[None, :].expand(2, -1)
    got_k, got_v = pool.gather(0, 0, slots, torch.device("cpu"))
    torch.testing.assert_close(got_k, k.transpose(0, 1))
    torch.testing.assert_close(got_v, -k.transpose(0, 1))
    del pool, got_k, got_v
    gc.collect()
    assert not runtime.registered
