"""Unit tests for ``ltri_rag.config.LtriConfig``."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ltri_rag.config import LtriConfig

MODE_DEFAULTS = {
    "full": dict(position_scheme="absolute", segmentation="fixed", index_vectors="static", voting=False,
                 persistence=False),
    "streaming": dict(position_scheme="contiguous", segmentation="fixed", index_vectors="static", voting=False,
                      persistence=False),
    "infllm": dict(position_scheme="fixed", segmentation="fixed", index_vectors="static", voting=False,
                   persistence=False, span_scoring="dot", consensus_weight=0.0, lookahead=False),
    "ltri": dict(position_scheme="contiguous", segmentation="triangle", index_vectors="dynamic", voting=False,
                 persistence=True, span_scoring="softmax", lookahead=True),
}


@pytest.mark.parametrize("mode", list(MODE_DEFAULTS))
def test_mode_defaults(mode):
    cfg = LtriConfig(mode=mode)
    for name, value in MODE_DEFAULTS[mode].items():
        assert getattr(cfg, name) == value, name
    assert cfg.retrieves == (mode in ("infllm", "ltri"))
    assert cfg.max_unit_len == (cfg.block_size if cfg.segmentation == "fixed" else cfg.span_max_len)


def test_default_mode_is_ltri():
    cfg = LtriConfig()
    assert cfg.mode == "ltri"
    assert cfg.segmentation == "triangle" and cfg.index_vectors == "dynamic"
    assert cfg.max_unit_len == cfg.span_max_len


def test_explicit_fields_override_mode_defaults():
    cfg = LtriConfig(mode="ltri", position_scheme="absolute", segmentation="fixed", voting=False)
    assert cfg.position_scheme == "absolute"
    assert cfg.segmentation == "fixed"
    assert cfg.max_unit_len == cfg.block_size
    assert cfg.voting is False
    assert cfg.persistence is True  # still the mode default
    cfg = LtriConfig(mode="infllm", index_vectors="dynamic", voting=True)
    assert cfg.index_vectors == "dynamic" and cfg.voting is True and cfg.segmentation == "fixed"


def test_config_is_frozen():
    cfg = LtriConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.budget = 10  # type: ignore[misc]
    with pytest.raises(TypeError):
        LtriConfig("ltri")  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize(
    "field,value,error",
    [
        ("mode", "bogus", ValueError),
        ("position_scheme", "relative", ValueError),
        ("segmentation", "semantic", ValueError),
        ("index_vectors", "adaptive", ValueError),
        ("retrieval_scope", "per_head", ValueError),
        ("num_sink_tokens", -1, ValueError),
        ("budget", -5, ValueError),
        ("local_window", 0, ValueError),
        ("chunk_size", 0, ValueError),
        ("evict_stride", -3, ValueError),
        ("page_size", 0, ValueError),
        ("block_size", 0, ValueError),
        ("span_min_len", 0, ValueError),
        ("num_index_vectors", 0, ValueError),
        ("min_index_vectors", 0, ValueError),
        ("chunk_size", 1.5, TypeError),
        ("budget", "2048", TypeError),
        ("local_window", True, TypeError),
        ("page_size", None, TypeError),
        ("voting", "yes", TypeError),
        ("persistence", 1, TypeError),
        ("kv_offload", 0, TypeError),
        ("triangle_alpha", -0.5, ValueError),
        ("triangle_alpha", "1", TypeError),
        ("triangle_alpha", True, TypeError),
        ("triangle_alpha", float("nan"), TypeError),
        ("persistence_decay", False, TypeError),
        ("persistence_bonus", -1.0, ValueError),
        ("nms_min_score", "0", TypeError),
        ("nms_min_score", False, TypeError),
        ("persistence_decay", 1.0, ValueError),
        ("persistence_decay", -0.1, ValueError),
        ("persistence_decay", 7, ValueError),
    ],
)
def test_bad_values_raise_with_value_in_message(field, value, error):
    with pytest.raises(error) as excinfo:
        LtriConfig(**{field: value})
    message = str(excinfo.value)
    assert repr(value) in message or str(value) in message, message
    assert field in message, message


def test_span_lengths_and_index_vector_bounds_are_ordered():
    with pytest.raises(ValueError, match="7"):
        LtriConfig(span_min_len=8, span_max_len=7)
    LtriConfig(span_min_len=8, span_max_len=8)  # equal is fine
    with pytest.raises(ValueError, match="3"):
        LtriConfig(min_index_vectors=4, max_index_vectors=3)
    LtriConfig(min_index_vectors=4, max_index_vectors=4)


def test_infllm_forbids_triangle_segmentation():
    with pytest.raises(ValueError, match="triangle"):
        LtriConfig(mode="infllm", segmentation="triangle")


def test_valid_edge_values_accepted():
    cfg = LtriConfig(num_sink_tokens=0, budget=0, triangle_alpha=0, persistence_bonus=0.0, nms_min_score=-3,
                     persistence_decay=0.0)
    assert cfg.budget == 0 and cfg.nms_min_score == -3
    assert LtriConfig(persistence_decay=0.999).persistence_decay == 0.999


@pytest.mark.parametrize("mode", list(MODE_DEFAULTS))
def test_to_dict_from_dict_round_trip(mode):
    cfg = LtriConfig(mode=mode, budget=1000, local_window=512, span_max_len=64, retrieval_scope="per_kv_head")
    data = cfg.to_dict()
    assert isinstance(data, dict)
    assert data["mode"] == mode and data["budget"] == 1000
    assert set(data) == {f.name for f in dataclasses.fields(LtriConfig)}
    assert LtriConfig.from_dict(data) == cfg
    # JSON-serialisable
    assert LtriConfig.from_dict(json.loads(json.dumps(data))) == cfg
    # partial dicts take the remaining defaults
    assert LtriConfig.from_dict({"mode": mode}) == LtriConfig(mode=mode)


def test_from_dict_unknown_keys_raise():
    data = LtriConfig().to_dict()
    data["bogus_field"] = 1
    data["another"] = 2
    with pytest.raises(ValueError, match="bogus_field") as excinfo:
        LtriConfig.from_dict(data)
    assert "another" in str(excinfo.value)


def test_from_dict_validates_values():
    data = LtriConfig().to_dict()
    data["chunk_size"] = 0
    with pytest.raises(ValueError, match="chunk_size"):
        LtriConfig.from_dict(data)


def test_replace_changes_fields_and_revalidates():
    cfg = LtriConfig()
    new = cfg.replace(budget=4096, chunk_size=256)
    assert new.budget == 4096 and new.chunk_size == 256
    assert cfg.budget == 2048  # original unchanged
    assert new.mode == cfg.mode and new.segmentation == cfg.segmentation
    with pytest.raises(ValueError, match="-1"):
        cfg.replace(budget=-1)


@pytest.mark.parametrize("old_mode", list(MODE_DEFAULTS))
@pytest.mark.parametrize("new_mode", list(MODE_DEFAULTS))
def test_replace_mode_rederives_defaults(old_mode, new_mode):
    cfg = LtriConfig(mode=old_mode).replace(mode=new_mode)
    assert cfg.mode == new_mode
    for name, value in MODE_DEFAULTS[new_mode].items():
        assert getattr(cfg, name) == value, (old_mode, new_mode, name)
    assert cfg == LtriConfig(mode=new_mode)


def test_replace_mode_keeps_explicit_non_default_fields():
    cfg = LtriConfig(mode="ltri", position_scheme="absolute", voting=False, budget=512)
    infllm = cfg.replace(mode="infllm")
    assert infllm.position_scheme == "absolute"  # not ltri's default: kept
    assert infllm.voting is False
    assert infllm.budget == 512
    assert infllm.segmentation == "fixed"  # ltri's default: re-derived
    assert infllm.index_vectors == "static"
    assert infllm.persistence is False
    # explicit changes passed with the mode win
    both = cfg.replace(mode="infllm", index_vectors="dynamic")
    assert both.index_vectors == "dynamic"
    # ... and are validated against the new mode
    with pytest.raises(ValueError, match="triangle"):
        cfg.replace(mode="infllm", segmentation="triangle")


def test_replace_to_bad_mode_raises():
    with pytest.raises(ValueError, match="bogus"):
        LtriConfig().replace(mode="bogus")


def test_fast_preset_changes_only_its_fields():
    from ltri_rag.config import FAST_PRESET

    fast = LtriConfig.fast()
    assert fast.decode_retrieval_stride == 8
    assert {k: getattr(fast, k) for k in FAST_PRESET} == FAST_PRESET
    default = LtriConfig()
    changed = {k for k, v in fast.to_dict().items() if v != getattr(default, k)}
    assert changed == set(FAST_PRESET)
    with pytest.raises(TypeError):  # read-only: a caller cannot change what fast() means for everyone
        FAST_PRESET["budget"] = 1  # type: ignore[index]


def test_fast_preset_takes_overrides_and_validates_them():
    cfg = LtriConfig.fast(budget=4096, index_precision="int8")
    assert cfg.budget == 4096 and cfg.index_precision == "int8" and cfg.decode_retrieval_stride == 8
    assert LtriConfig.fast(decode_retrieval_stride=4).decode_retrieval_stride == 4
    with pytest.raises(ValueError, match="decode_retrieval_stride.*0"):
        LtriConfig.fast(decode_retrieval_stride=0)
    with pytest.raises(TypeError, match="no_such_field"):
        LtriConfig.fast(no_such_field=1)
