"""The modes under test and how each one's session is set up: its engine configuration, the SDPA kernel of
``full``, and the random token ids every mode gets at a length."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ltri_rag import LtriConfig
from ltri_rag.config import FAST_PRESET

MODES = ("full", "streaming", "infllm", "ltri", "ltri_eager", "ltri_host_pool", "ltri_gpu_pool", "ltri_stride8",
         "ltri_stride8_eager", "ltri_stride8_reuse_graph", "ltri_stride8_gpu_pool", "ltri_c512", "ltri_c4096",
         "ltri_c8192", "ltri_device_select", "ltri_all_queries", "ltri_staged_host_pages", "ltri_small_tier",
         "ltri_small_tier_zero_copy", "ltri_torch_decode_scoring", "ltri_small_tier_torch_pinned", "ltri_torch_fill",
         "ltri_torch_rank", "ltri_fused_assembly", "ltri_device_select_fused", "ltri_host_select",
         "ltri_torch_assembly", "ltri_assemble_r8", "ltri_assemble_r16", "ltri_no_host_cache", "ltri_count_host_cache",
         "ltri_small_tier_no_cache", "ltri_small_tier_count", "ltri_prev_small_kernels", "ltri_prev_finish",
         "ltri_torch_consensus", "ltri_torch_slots", "ltri_torch_glue", "ltri_unpaired", "ltri_s22_selection",
         "ltri_row_scan", "ltri_share60", "ltri_full_sort", "ltri_int8", "ltri_recomputed_scores",
         "ltri_s28_scoring", "ltri_pageable_readback", "ltri_mass256", "ltri_mass_all", "ltri_fast",
         "ltri_replay_evicting", "ltri_fast_replay_evicting", "ltri_evict256", "ltri_fast_evict256",
         "ltri_fast_c8192", "ltri_s33_decode", "ltri_fused_finish", "ltri_slot_glue", "ltri_s35",
         "ltri_s37_assembly", "ltri_pdl_finish", "ltri_s40_finish")
RETRIEVING = ("infllm", "ltri", "ltri_eager", "ltri_host_pool", "ltri_gpu_pool", "ltri_stride8", "ltri_stride8_eager",
              "ltri_stride8_reuse_graph", "ltri_stride8_gpu_pool", "ltri_c512", "ltri_c4096", "ltri_c8192",
              "ltri_device_select",
              "ltri_all_queries", "ltri_staged_host_pages", "ltri_small_tier", "ltri_small_tier_zero_copy",
              "ltri_torch_decode_scoring", "ltri_small_tier_torch_pinned", "ltri_torch_fill",
              "ltri_torch_rank", "ltri_fused_assembly", "ltri_device_select_fused", "ltri_host_select",
              "ltri_torch_assembly", "ltri_assemble_r8", "ltri_assemble_r16", "ltri_no_host_cache",
              "ltri_count_host_cache", "ltri_small_tier_no_cache", "ltri_small_tier_count",
              "ltri_prev_small_kernels", "ltri_prev_finish", "ltri_torch_consensus", "ltri_torch_slots",
              "ltri_torch_glue", "ltri_unpaired", "ltri_s22_selection", "ltri_row_scan",
              "ltri_share60", "ltri_full_sort", "ltri_int8", "ltri_recomputed_scores",
              "ltri_s28_scoring", "ltri_pageable_readback", "ltri_mass256", "ltri_mass_all", "ltri_fast",
              "ltri_replay_evicting", "ltri_fast_replay_evicting", "ltri_evict256", "ltri_fast_evict256",
              "ltri_fast_c8192", "ltri_s33_decode", "ltri_fused_finish", "ltri_slot_glue", "ltri_s35",
              "ltri_s37_assembly", "ltri_pdl_finish", "ltri_s40_finish")
# variants: an engine mode with settings of its own. ``ltri`` itself runs LtriConfig's defaults (the span pool on the
# GPU up to its budget, pinned host memory beyond); ``ltri_host_pool``: the whole pool in pinned host memory (the
# default before the tiered pool); ``ltri_gpu_pool``: the whole pool in GPU memory, unbounded; ``ltri_stride8``: a
# decoded token retrieves once in 8 and reuses the memory part in between (``decode_retrieval_stride``), those
# steps replayed as a CUDA graph on CUDA (``decode_graph``), the retrieving steps too while the pool is on the GPU
# (``decode_graph_retrieval``); ``ltri_stride8_eager``: the same with every step eager; ``ltri_stride8_reuse_graph``:
# only the reuse steps as graphs (the session 13 engine); ``ltri_stride8_gpu_pool``: ``ltri_stride8`` with the whole
# pool on the GPU (so retrieving steps are captured at any length that fits); ``ltri_eager``: ``ltri`` (every decode
# step retrieves) without CUDA graphs;
# ``ltri_c512``: prompts read in chunks of 512 tokens instead of the default 2,048 (4x the passes, so 4x the per-pass
# host work; a finer retrieval: one selection serves 512 queries); ``ltri_c4096`` / ``ltri_c8192``: chunks of 4,096 /
# 8,192 tokens (half / a quarter of the passes, each selection serving more queries); ``ltri_device_select``:
# spans chosen on the device, without a read-back (``selection_on_device=True``; on CUDA the default ``"auto"``
# does the same since session 18); ``ltri_host_select``: spans of prompt passes and eager steps chosen on the host
# after a read-back of the scores (``selection_on_device=False``, the default before session 18);
# ``ltri_all_queries``: span scoring reads every query of a chunk (the default before ``score_queries``: the
# session 8 engine);
# ``ltri_staged_host_pages``: ``ltri`` without ``zero_copy_host_pages`` (pool pages in pinned host memory are gathered
# and scattered by the host and copied over, and a retrieving step touching them runs eagerly: the default before
# session 16); ``ltri_small_tier`` / ``ltri_small_tier_zero_copy``: staged and in-place host pages with the device tier
# held to 4 GiB (``kv_device_gib``), so that a 128K prompt of an 8B model already keeps most of its pages in host
# memory: the 1M situation at a tenth of the cost (both now with the device cache of host rows);
# ``ltri_no_host_cache`` / ``ltri_small_tier_no_cache``: ``ltri`` / ``ltri_small_tier_zero_copy`` without that cache
# (``host_cache_tokens=0``: every selected host row read over PCIe, the default before session 20)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"ltri_host_pool": ("ltri", {"kv_offload": True}),
                                                   "ltri_gpu_pool": ("ltri", {"kv_offload": False}),
                                                   "ltri_stride8": ("ltri", {"decode_retrieval_stride": 8}),
                                                   "ltri_stride8_eager": ("ltri", {"decode_retrieval_stride": 8,
                                                                                   "decode_graph": False}),
                                                   "ltri_stride8_reuse_graph": ("ltri", {
                                                       "decode_retrieval_stride": 8,
                                                       "decode_graph_retrieval": False}),
                                                   "ltri_stride8_gpu_pool": ("ltri", {"decode_retrieval_stride": 8,
                                                                                      "kv_offload": False}),
                                                   "ltri_eager": ("ltri", {"decode_graph": False}),
                                                   "ltri_staged_host_pages": ("ltri", {"zero_copy_host_pages": False}),
                                                   "ltri_small_tier": ("ltri", {"kv_device_gib": 4.0,
                                                                                "zero_copy_host_pages": False}),
                                                   "ltri_small_tier_zero_copy": ("ltri", {
                                                       "kv_device_gib": 4.0, "zero_copy_host_pages": True}),
                                                   "ltri_c512": ("ltri", {"chunk_size": 512}),
                                                   "ltri_c4096": ("ltri", {"chunk_size": 4096}),
                                                   "ltri_c8192": ("ltri", {"chunk_size": 8192}),
                                                   "ltri_device_select": ("ltri", {"selection_on_device": True}),
                                                   "ltri_all_queries": ("ltri", {"score_queries": None}),
                                                   "ltri_torch_decode_scoring": ("ltri", {}),
                                                   "ltri_torch_fill": ("ltri", {}),
                                                   "ltri_torch_rank": ("ltri", {}),
                                                   "ltri_fused_assembly": ("ltri", {}),
                                                   "ltri_device_select_fused": ("ltri", {"selection_on_device": True}),
                                                   "ltri_host_select": ("ltri", {"selection_on_device": False}),
                                                   "ltri_torch_assembly": ("ltri", {}),
                                                   "ltri_assemble_r8": ("ltri", {}),
                                                   "ltri_assemble_r16": ("ltri", {}),
                                                   "ltri_no_host_cache": ("ltri", {"host_cache_tokens": 0}),
                                                   "ltri_count_host_cache": ("ltri", {}),
                                                   "ltri_prev_small_kernels": ("ltri", {}),
                                                   "ltri_prev_finish": ("ltri", {}),
                                                   "ltri_fused_finish": ("ltri", {}),
                                                   "ltri_slot_glue": ("ltri", {}),
                                                   "ltri_s35": ("ltri", {}),
                                                   "ltri_s37_assembly": ("ltri", {}),
                                                   "ltri_pdl_finish": ("ltri", {}),
                                                   "ltri_s40_finish": ("ltri", {}),
                                                   "ltri_torch_consensus": ("ltri", {}),
                                                   "ltri_torch_slots": ("ltri", {}),
                                                   "ltri_torch_glue": ("ltri", {}),
                                                   "ltri_unpaired": ("ltri", {}),
                                                   "ltri_s22_selection": ("ltri", {}),
                                                   "ltri_row_scan": ("ltri", {}),
                                                   "ltri_recomputed_scores": ("ltri", {}),
                                                   "ltri_s28_scoring": ("ltri", {}),
                                                   "ltri_pageable_readback": ("ltri", {}),
                                                   "ltri_share60": ("ltri", {}),
                                                   "ltri_full_sort": ("ltri", {}),
                                                   "ltri_int8": ("ltri", {"index_precision": "int8"}),
                                                   "ltri_mass256": ("ltri", {"mass_queries": 256}),
                                                   "ltri_mass_all": ("ltri", {"mass_queries": None}),
                                                   "ltri_fast": ("ltri", dict(FAST_PRESET)),
                                                   "ltri_replay_evicting": ("ltri", {}),
                                                   "ltri_fast_replay_evicting": ("ltri", dict(FAST_PRESET)),
                                                   "ltri_evict256": ("ltri", {"evict_stride": 256}),
                                                   "ltri_fast_evict256": ("ltri", {**FAST_PRESET, "evict_stride": 256}),
                                                   "ltri_fast_c8192": ("ltri", {**FAST_PRESET, "chunk_size": 8192}),
                                                   "ltri_s33_decode": ("ltri", {"evict_stride": 64}),
                                                   "ltri_small_tier_no_cache": ("ltri", {
                                                       "kv_device_gib": 4.0, "zero_copy_host_pages": True,
                                                       "host_cache_tokens": 0}),
                                                   "ltri_small_tier_count": ("ltri", {
                                                       "kv_device_gib": 4.0, "zero_copy_host_pages": True}),
                                                   "ltri_small_tier_torch_pinned": ("ltri", {
                                                       "kv_device_gib": 4.0, "zero_copy_host_pages": True})}
# modes that differ from their variant by a library module setting, patched while the mode runs (for A/B runs of
# a change in one call): ``ltri_torch_decode_scoring``: a decoded token's span scoring on the torch path (the default
# before session 17's one-query Triton kernel); ``ltri_small_tier_torch_pinned``: ``ltri_small_tier_zero_copy`` with
# the host tier from torch's pinned allocator (before session 17: power-of-two blocks) instead of registered memory;
# ``ltri_torch_fill``: the device-side budget fill of span selection (decode steps) in torch operations instead of
# session 17's one Triton launch; ``ltri_torch_rank``: its ranking keys in torch operations instead of two launches;
# ``ltri_fused_assembly`` / ``ltri_device_select_fused``: ``ltri`` / ``ltri_device_select`` with the memory part of a
# device-side selection built in one launch per sequence (``layer_assembly.FUSED_DEVICE_ASSEMBLY``; the default since
# session 18, so both are now ``ltri``); ``ltri_torch_assembly``: ``ltri`` with that part built by torch operations
# (the default before session 18); ``ltri_assemble_r8`` / ``ltri_assemble_r16``: the one-launch assembly with 8 / 16
# output rows per program instead of 32 (``kernels.triton_assemble.BLOCK_ROWS``; 4x / 2x the programs);
# ``ltri_count_host_cache`` / ``ltri_small_tier_count``: ``ltri`` / ``ltri_small_tier_zero_copy`` counting the host
# rows the decode steps read and how many came from the cache (``COUNT_HOST_CACHE``: two atomic adds per program;
# the row gets ``host_cache_hits`` / ``host_cache_rows``); ``ltri_prev_small_kernels``: ``ltri`` with the previous
# forms of three small kernels (session 21): the budget fill's tail walk by a reduction per step, the rotation and the
# one-launch assembly on one tile with gathered partner columns, a decoded token's queries rotated by one program);
# ``ltri_prev_finish``: ``ltri`` with the decode attention's finishing pass in its form before session 22 (block 0
# merging every column, the band walking the KV heads; ``kernels.triton_decode.ONE_TILE_FINISH`` off);
# ``ltri_fused_finish``: ``ltri`` with the decode attention in one launch (``triton_decode.FUSED_FINISH`` on);
# ``ltri_slot_glue``: ``ltri`` with the memory assembly reading its slots in place and counting each head's valid
# entries itself (``triton_assemble.SLOT_GLUE_IN_KERNEL`` on; the default since session 38, so now ``ltri``);
# ``ltri_s37_assembly``: ``ltri`` with that switch off (the assembly before session 38: the slots made contiguous and
# each head's count found by torch operations); ``ltri_s35``: both candidates (session 35's); ``ltri_pdl_finish``:
# the decode attention's finishing pass as a programmatic dependent launch (``triton_decode.PDL_FINISH`` on; the
# default since session 41, so now ``ltri``); ``ltri_s40_finish``: ``ltri`` with that switch off (a plain launch);
# ``ltri_torch_consensus``: ``ltri`` with a device selection's consensus read and vote in eleven torch operations
# per layer and selection instead of one launch (``consensus.FUSED_CONSENSUS`` off; the default before session 22);
# ``ltri_torch_slots``: the slot matrix of a device selection by a binary search and ten torch operations instead of
# one launch (``span_memory.FUSED_SLOTS`` off; before session 22); ``ltri_torch_glue``: both off;
# ``ltri_unpaired``: a device layer's two selections under consensus (the one that votes, the one that loads) ranked,
# sorted and filled one after the other instead of together (``retrieval.PAIRED_SORT`` off; before session 23; the
# consensus read and vote stay two launches); ``ltri_s22_selection``: that and the persistence update in four torch
# operations instead of one launch (``retrieval.FUSED_RECENCY`` off too); ``ltri_row_scan``: the paired selection's
# running sums by torch's scan along the rows instead of one flat scan (``retrieval.FLAT_ROW_SUMS`` off);
# ``ltri_share60``: the span pool's device tier sized at 60% of the free device memory (``cache.DEVICE_POOL_SHARE``;
# the default before session 24, whose run calls 80% ``ltri_share80``, now the default): more of a 1M prompt's pages
# in host memory; ``ltri_full_sort``: a device selection's rows sorted by torch's segmented sort and filled in
# further launches (``retrieval.SORT_FILL`` off; before session 25) instead of one program per row (rows of more
# than 1,024 spans: after rounds of chunk sorts); ``ltri_int8``: index vectors kept as int8 codes with a scale per
# vector and KV head (``LtriConfig.index_precision="int8"``): half the bytes a decoded token's scoring reads;
# ``ltri_recomputed_scores``: a prompt chunk's span scores computed twice by the Triton scorer, nothing kept between
# its passes (``kernels.scoring_launch.SCORE_BUFFER_BYTES`` 0); ``ltri_s28_scoring``: that with session 28's launch
# of the chunk kernels too (128 x 64 tiles, 8 warps, 2 stages, slot loads masked by the valid bits);
# ``ltri_pageable_readback``: span segmentation's read-back copied into pageable host memory (``spans.PINNED_READ_BACK``
# off; before session 30) instead of page-locked buffers; ``ltri_mass256`` / ``ltri_mass_all``: the key mass of a
# prompt chunk summed over 256 of its queries / over every query (``LtriConfig.mass_queries``); ``ltri_fast``: the
# opt-in speed preset (``LtriConfig.fast()``, ``FAST_PRESET``: stride 8 since session 32's quality rule; that
# session's call e ran it as stride 8 + int8 index vectors + key mass of 256 queries); ``ltri_replay_evicting`` /
# ``ltri_fast_replay_evicting``: ``ltri`` / ``ltri_fast`` with the last retrieving decode step of each eviction
# cycle replaying its span set's CUDA graph instead of running eagerly (``decode_graph.REPLAY_EVICTING_STEPS``,
# the default since session 34); ``ltri_evict256`` / ``ltri_fast_evict256``: a decoded sequence's window
# evicts every 256 tokens instead of 64 (``LtriConfig.evict_stride``, 256 by default since session 34);
# ``ltri_fast_c8192``: the preset with prompts read in chunks of 8,192 tokens (a candidate, session 33's rule);
# ``ltri_s33_decode``: the decode defaults before session 34 (evict stride 64, evicting steps run eagerly)
MODULE_PATCHES: dict[str, tuple[tuple[str, str, Any], ...]] = {
    "ltri_fused_assembly": (("ltri_rag.layer_assembly", "FUSED_DEVICE_ASSEMBLY", True),),
    "ltri_device_select_fused": (("ltri_rag.layer_assembly", "FUSED_DEVICE_ASSEMBLY", True),),
    "ltri_torch_assembly": (("ltri_rag.layer_assembly", "FUSED_DEVICE_ASSEMBLY", False),),
    "ltri_assemble_r8": (("ltri_rag.kernels.triton_assemble", "BLOCK_ROWS", 8),),
    "ltri_count_host_cache": (("ltri_rag.kernels.triton_assemble", "COUNT_HOST_CACHE", True),),
    "ltri_small_tier_count": (("ltri_rag.kernels.triton_assemble", "COUNT_HOST_CACHE", True),),
    "ltri_assemble_r16": (("ltri_rag.kernels.triton_assemble", "BLOCK_ROWS", 16),),
    "ltri_torch_rank": (("ltri_rag.retrieval", "FUSED_RANK", False),),
    "ltri_torch_fill": (("ltri_rag.retrieval", "FUSED_FILL", False),),
    "ltri_torch_decode_scoring": (("ltri_rag.kernels.scoring", "AUTO_ONE_QUERY_TRITON", False),),
    "ltri_replay_evicting": (("ltri_rag.decode_graph", "REPLAY_EVICTING_STEPS", True),),
    "ltri_fast_replay_evicting": (("ltri_rag.decode_graph", "REPLAY_EVICTING_STEPS", True),),
    "ltri_s33_decode": (("ltri_rag.decode_graph", "REPLAY_EVICTING_STEPS", False),),
    "ltri_small_tier_torch_pinned": (("ltri_rag.host_memory", "REGISTER_HOST_MEMORY", False),),
    "ltri_prev_small_kernels": (("ltri_rag.kernels.triton_select", "SCALAR_WALK", False),
                                ("ltri_rag.kernels.triton_rope", "HALF_TILES", False),
                                ("ltri_rag.kernels.triton_rope", "SPREAD_FEW_ROWS", False),
                                ("ltri_rag.kernels.triton_assemble", "HALF_TILES", False)),
    "ltri_prev_finish": (("ltri_rag.kernels.triton_decode", "ONE_TILE_FINISH", False),),
    "ltri_fused_finish": (("ltri_rag.kernels.triton_decode", "FUSED_FINISH", True),),
    "ltri_slot_glue": (("ltri_rag.kernels.triton_assemble", "SLOT_GLUE_IN_KERNEL", True),),
    "ltri_s35": (("ltri_rag.kernels.triton_decode", "FUSED_FINISH", True),
                 ("ltri_rag.kernels.triton_assemble", "SLOT_GLUE_IN_KERNEL", True)),
    "ltri_s37_assembly": (("ltri_rag.kernels.triton_assemble", "SLOT_GLUE_IN_KERNEL", False),),
    "ltri_pdl_finish": (("ltri_rag.kernels.triton_decode", "PDL_FINISH", True),),
    "ltri_s40_finish": (("ltri_rag.kernels.triton_decode", "PDL_FINISH", False),),
    "ltri_torch_consensus": (("ltri_rag.consensus", "FUSED_CONSENSUS", False),),
    "ltri_torch_slots": (("ltri_rag.span_memory", "FUSED_SLOTS", False),),
    "ltri_torch_glue": (("ltri_rag.consensus", "FUSED_CONSENSUS", False),
                        ("ltri_rag.span_memory", "FUSED_SLOTS", False)),
    "ltri_unpaired": (("ltri_rag.retrieval", "PAIRED_SORT", False),),
    "ltri_s22_selection": (("ltri_rag.retrieval", "PAIRED_SORT", False),
                           ("ltri_rag.retrieval", "FUSED_RECENCY", False)),
    "ltri_row_scan": (("ltri_rag.retrieval", "FLAT_ROW_SUMS", False),),
    "ltri_share60": (("ltri_rag.cache", "DEVICE_POOL_SHARE", 0.6),),
    "ltri_full_sort": (("ltri_rag.retrieval", "SORT_FILL", False),),
    "ltri_recomputed_scores": (("ltri_rag.kernels.scoring_launch", "SCORE_BUFFER_BYTES", 0),),
    "ltri_s28_scoring": (("ltri_rag.kernels.scoring_launch", "SCORE_BUFFER_BYTES", 0),
                         ("ltri_rag.kernels.scoring_launch", "CHUNK_LAUNCH", (128, 64, 8, 2)),
                         ("ltri_rag.kernels.scoring_launch", "CHUNK_LOAD_PADDING", False)),
    "ltri_pageable_readback": (("ltri_rag.spans", "PINNED_READ_BACK", False),)}


def engine_config(mode: str, engine: dict[str, Any], backend: str) -> LtriConfig:
    """The engine configuration of ``mode``: LtriConfig defaults, ``engine`` overrides, the attention backend
    (and a variant's own settings on top)."""
    if mode == "full":
        return LtriConfig(mode="full")
    base, own = VARIANTS.get(mode, (mode, {}))
    return LtriConfig(mode=base, attention_backend=backend, **{**engine, **own})


@contextmanager
def mode_context(mode: str, sdpa_backend: str) -> Iterator[None]:
    """Pin PyTorch's SDPA backend for the ``full`` mode (``auto``: torch's own choice); apply a mode's
    ``MODULE_PATCHES`` while it runs."""
    patches = MODULE_PATCHES.get(mode, ())
    if patches:
        saved = []
        for module_name, name, value in patches:
            module = importlib.import_module(module_name)
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, value)
        try:
            yield
        finally:
            for module, name, value in saved:
                setattr(module, name, value)
        return
    if mode != "full" or sdpa_backend == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[sdpa_backend]
    order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                   SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH) if b != first]
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        ctx = sdpa_kernel(order, set_priority=True)  # the chosen one first, the others as fall-backs
    else:
        ctx = sdpa_kernel([first])
    with ctx:
        yield


def random_ids(vocab_size: int, length: int, seed: int) -> torch.Tensor:
    """``[1, length]`` seeded random token ids (the same for every mode at a length)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + length)
    return torch.randint(0, vocab_size, (1, length), generator=gen)
