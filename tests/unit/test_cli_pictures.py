"""``ltri-rag inspect`` and ``ltri-rag bench`` (PNG pictures), and the command line's light start: on a tiny random
model saved to disk (seconds), fixture result files, and one slow test of ``inspect`` on the real Qwen2.5-Coder-0.5B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ltri_rag.cli.bench import accuracy_series, latency_series
from tests.real_model import QWEN_GGUF
from tests.unit.test_cli import run, tiny_dir  # noqa: F401  (tiny_dir: the same tiny model folder fixture)

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
# a local window that holds the whole test document, so the spans cut on the window are the stored ones
WIDE_CONFIG = """\
num_sink_tokens = 8
local_window = 512
chunk_size = 32
budget = 64
page_size = 8
evict_stride = 4
span_min_len = 2
span_max_len = 12
"""
TEXT = ("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to unite "
        "some of the best blessings of existence; and had lived nearly twenty-one years in the world with very "
        "little to distress or vex her. She was the youngest of the two daughters of a most affectionate, indulgent "
        "father.")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"



@pytest.fixture(scope="module")
def wide_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "wide.toml"
    path.write_text(WIDE_CONFIG)
    return path


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "emma.txt"
    path.write_text(TEXT)
    return path


def png_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of a PNG file, checking its signature and header chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def tiny_args(tiny_dir: Path, config: Path) -> list[str]:
    return ["--model", str(tiny_dir), "--config", str(config), "--device", "cpu"]


def clipped(spans: list[list[int]], lo: int, hi: int) -> list[list[int]]:
    return [[max(s, lo), min(e, hi)] for s, e in spans]


# ------------------------------------------------------------------------------------------------- inspect
def test_inspect_a_text_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, text_file: Path, tiny_dir: Path,
                             wide_config: Path) -> None:
    out_dir = tmp_path / "pictures"
    temporary = set(Path(tempfile.gettempdir()).glob("ltri-inspect-*"))
    code, out, err = run(capsys, "inspect", text_file, *tiny_args(tiny_dir, wide_config), "--out", out_dir,
                         "--tokens", "64", "--start", "40", "--question", "How old was Emma?", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["doc_id"] == "emma.txt" and result["tokens"] == len(TEXT)  # one token per character
    assert result["layer"] == 1 and result["window"] == [40, 104]  # the middle of the two global layers
    names = sorted(Path(f).name for f in result["files"])
    assert names == ["attention_L1.png", "retrieval.png", "spans_L1.png"]
    for file in result["files"]:
        width, height = png_size(Path(file))
        assert width > 100 and height > 50 and Path(file).stat().st_size > 1000
    # the document fits in the local window: the spans cut on the drawn band are exactly the stored ones
    assert result["window_spans"] == clipped(result["stored_spans"], 40, 104)
    spans = result["window_spans"]
    assert spans[0][0] == 40 and spans[-1][1] == 104
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # a partition of the window
    assert result["documents_read"] == 1 and 1 <= len(result["cited"]) <= 4
    assert set(Path(tempfile.gettempdir()).glob("ltri-inspect-*")) <= temporary  # the temporary store is removed


def test_inspect_a_window_deep_in_a_document_longer_than_the_local_window(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, text_file: Path, tiny_dir: Path) -> None:
    """The window, the rows after it and the text before it up to the local window are read (nothing evicted)."""
    config = tmp_path / "narrow.toml"
    config.write_text(WIDE_CONFIG.replace("local_window = 512", "local_window = 40"))
    code, out, err = run(capsys, "inspect", text_file, *tiny_args(tiny_dir, config), "--out", tmp_path / "o",
                         "--tokens", "20", "--start", "200", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["window"] == [200, 220]
    spans = result["window_spans"]
    assert spans[0][0] == 200 and spans[-1][1] == 220 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    code, _, err = run(capsys, "inspect", text_file, *tiny_args(tiny_dir, config), "--tokens", "40")
    assert code == 2 and "--tokens 40: at most 29 with this config (local_window 40, span_max_len 12)" in err, err


def test_inspect_a_stored_document(capsys: pytest.CaptureFixture[str], tmp_path: Path, text_file: Path,
                                   tiny_dir: Path, wide_config: Path) -> None:
    store = tmp_path / "store"
    other = tmp_path / "other.txt"
    other.write_text("Paris is the capital of France. The Seine flows through it from east to west. " * 3)
    code, _, err = run(capsys, "ingest", text_file, other, "--store", store, *tiny_args(tiny_dir, wide_config))
    assert code == 0, err
    before = sorted(p.name for p in store.rglob("*"))
    out_dir = tmp_path / "pictures"
    code, out, err = run(capsys, "inspect", "--doc", "emma.txt", "--store", store, "--device", "cpu", "--out",
                         out_dir, "--layer", "0", "--question", "Who was the youngest daughter?", "-k", "3")
    assert code == 0, err
    assert "question read over 2 document(s)" in out
    for name in ("attention_L0.png", "spans_L0.png", "retrieval.png"):
        assert png_size(out_dir / name)[0] > 100
    assert sorted(p.name for p in store.rglob("*")) == before  # read only


@pytest.mark.parametrize("argv,message", [
    (("inspect",), "one of the arguments FILE --doc is required"),
    (("inspect", "a.txt", "--doc", "x"), "argument --doc: not allowed with argument FILE"),
    (("inspect", "a.txt", "--tokens", "8"), "argument --tokens: expected 16 to 1024 tokens, got 8"),
    (("inspect", "a.txt", "--tokens", "many"), "argument --tokens: expected a positive integer, got 'many'"),
    (("inspect", "a.txt", "--layer", "-1"), "argument --layer: expected an integer >= 0, got -1"),
    (("inspect", "a.txt", "--start", "x"), "argument --start: expected an integer >= 0, got 'x'"),
    (("inspect", "a.txt", "-k", "0"), "argument -k: expected a positive integer, got 0"),
    (("bench", "--model", "x"), "unrecognized arguments: --model x"),  # bench loads no model
])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err, err


@pytest.mark.parametrize("extra,message", [
    (("--layer", "7"), "ltri-rag inspect: error: --layer 7: the model has 2 layers (0-1)"),
    (("--start", "5000"), f"ltri-rag inspect: error: --start 5000: the document has {len(TEXT)} tokens"),
    (("--question", "  "), "ltri-rag inspect: error: --question is empty"),
])
def test_bad_values_found_late_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, text_file: Path,
                                      tiny_dir: Path, wide_config: Path, extra: tuple[str, ...], message: str) -> None:
    """Values only checkable once the model or document is loaded: one line naming the value, exit code 2."""
    code, out, err = run(capsys, "inspect", text_file, *tiny_args(tiny_dir, wide_config), "--out", tmp_path / "o",
                         *extra)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_inspect_unknown_document_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, text_file: Path,
                                         tiny_dir: Path, wide_config: Path) -> None:
    store = tmp_path / "store"
    assert run(capsys, "ingest", text_file, "--store", store, *tiny_args(tiny_dir, wide_config))[0] == 0
    code, _, err = run(capsys, "inspect", "--doc", "nope.txt", "--store", store, "--device", "cpu")
    assert code == 2
    assert "--doc 'nope.txt' is not in collection 'default'" in err and "it holds: emma.txt" in err, err


def test_inspect_without_a_store_is_a_runtime_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "inspect", "--doc", "a", "--store", tmp_path / "none")
    assert code == 1 and err.startswith("ltri-rag: error: no store at"), err


# ------------------------------------------------------------------------------------------------- bench
QUALITY_ROWS = [
    {"model": "tiny", "system": system, "task": "niah_single", "length": length, "depth": 0.5, "score": score}
    for system, length, score in [("full", 4096, 1.0), ("full", 4096, 1.0), ("full", 8192, 0.5),
                                  ("ltri", 4096, 1.0), ("ltri", 4096, 0.0), ("ltri", 8192, 1.0)]
]
E2E_RESULT = {
    "meta": {"device": "cpu", "dtype": "float32"},
    "models": [{"name": "tiny"}],
    "prefill": [{"model": "tiny", "mode": mode, "length": n, "status": status, "seconds": s}
                for mode, n, status, s in [("full", 1024, "ok", 0.5), ("full", 4096, "ok", 3.0),
                                           ("ltri", 1024, "ok", 0.6), ("ltri", 4096, "OOM", None)]],
    "decode": [{"model": "tiny", "mode": mode, "length": n, "status": "ok", "median_ms": ms}
               for mode, n, ms in [("full", 1024, 20.0), ("full", 4096, 40.0), ("ltri", 1024, 25.0)]],
}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    (root / "quality" / "tiny").mkdir(parents=True)
    (root / "e2e_tiny").mkdir()
    (root / "kernels").mkdir()
    lines = [json.dumps(r) for r in QUALITY_ROWS] + ['{"model": "tiny", "trunc']  # a cut last line is skipped
    (root / "quality" / "tiny" / "samples.jsonl").write_text("\n".join(lines) + "\n")
    (root / "e2e_tiny" / "bench.json").write_text(json.dumps(E2E_RESULT))
    (root / "kernels" / "bench.json").write_text(json.dumps({"meta": {}, "rows": [{"ms": 1.0}]}))  # not plotted
    return root


def test_series_from_result_files() -> None:
    means, counts = accuracy_series(QUALITY_ROWS + [{"system": "x"}])
    assert means == {"full": {4096: 1.0, 8192: 0.5}, "ltri": {4096: 0.5, 8192: 1.0}}
    assert counts == {"full": {4096: 2, 8192: 1}, "ltri": {4096: 2, 8192: 1}}
    prefill, decode, title = latency_series(E2E_RESULT)
    assert prefill == {"full": {1024: 0.5, 4096: 3.0}, "ltri": {1024: 0.6}}  # the OOM row is left out
    assert decode == {"full": {1024: 20.0, 4096: 40.0}, "ltri": {1024: 25.0}}
    assert title == "tiny (cpu, float32)"


def test_bench_renders_fixture_results(capsys: pytest.CaptureFixture[str], tmp_path: Path, results: Path) -> None:
    out_dir = tmp_path / "plots"
    code, out, err = run(capsys, "bench", "--results", results, "--out", out_dir, "--json")
    assert code == 0, err
    plots = json.loads(out)["plots"]
    assert [(p["kind"], Path(p["file"]).name) for p in plots] == [("accuracy", "accuracy_quality_tiny.png"),
                                                                  ("latency", "latency_e2e_tiny.png")]
    for p in plots:
        assert png_size(Path(p["file"]))[0] > 100


def test_bench_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "bench", "--results", tmp_path / "missing")
    assert code == 2 and f"--results '{tmp_path / 'missing'}' is not a folder" in err, err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "bench", "--results", tmp_path / "empty")
    assert code == 1 and "nothing to plot" in err, err


@pytest.mark.skipif(not (ROOT / "benchmarks" / "results").is_dir(), reason="no committed results")
def test_bench_renders_the_committed_results(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "bench", "--results", ROOT / "benchmarks" / "results", "--out", tmp_path, "--json")
    assert code == 0, err
    kinds = {p["kind"] for p in json.loads(out)["plots"]}
    assert kinds == {"accuracy", "latency"}


# ------------------------------------------------------------------------------------------------- light start
def test_parsing_imports_nothing_heavy() -> None:
    """``ltri-rag --help`` must not wait for torch / transformers: building the parser imports neither."""
    code = ("import sys\nimport ltri_rag, ltri_rag.cli\nltri_rag.cli.build_parser()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_package_names_load_on_first_use() -> None:
    import ltri_rag

    assert {"KVMemory", "LtriConfig", "load_model", "generate"} <= set(dir(ltri_rag))
    from ltri_rag import KVMemory
    from ltri_rag.memory import KVMemory as same

    assert ltri_rag.KVMemory is KVMemory is same
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = ltri_rag.nope  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------- real model
QWEN = QWEN_GGUF  # see tests/real_model.py


@pytest.mark.slow
@pytest.mark.skipif(not QWEN.is_file() and not os.environ.get("CI"), reason=f"model file {QWEN} not fetched")
def test_inspect_on_qwen(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``inspect`` of a demo excerpt on the real Qwen2.5-Coder-0.5B (CPU): the three pictures, spans over the window
    equal to the stored ones (the excerpt fits in the local window), and the answer's document cited."""
    from ltri_rag.cli.demo import demo_documents

    doc = tmp_path / "emma.txt"
    doc.write_text(demo_documents()["emma"])
    code, out, err = run(capsys, "inspect", doc, "--model", QWEN, "--device", "cpu", "--out", tmp_path / "pics",
                         "--question", "How many miles away is Emma's sister settled?", "--json")
    assert code == 0, err
    result = json.loads(out)
    with capsys.disabled():
        print(f"\n[inspect] {result['tokens']} tokens, layer {result['layer']}, {len(result['window_spans'])} spans "
              f"in the window, cited {[(c['token_start'], c['token_end']) for c in result['cited']]}, "
              f"{result['seconds']:.0f} s")
    assert sorted(Path(f).name for f in result["files"]) == [f"attention_L{result['layer']}.png", "retrieval.png",
                                                            f"spans_L{result['layer']}.png"]
    for file in result["files"]:
        assert png_size(Path(file))[0] > 100
    lo, hi = result["window"]
    assert result["window_spans"] == clipped(result["stored_spans"], lo, hi)
    assert result["cited"] and all(c["doc_id"] == "emma.txt" for c in result["cited"])  # (the store holds one file)
    # what the citations must show: a cited region reaches into the evidence (tokens as the store encoded them)
    import torch
    from transformers import AutoTokenizer

    from ltri_rag.memory_ingest import encode_document

    text = doc.read_text()
    lo_char = text.index("only sixteen miles off")
    hi_char = lo_char + len("only sixteen miles off")
    tokenizer = AutoTokenizer.from_pretrained(str(QWEN.parent), gguf_file=QWEN.name)
    ids, offsets = encode_document(tokenizer, text)
    starts = offsets.boundaries(torch.arange(ids.numel() + 1)).tolist()
    evidence = [i for i in range(ids.numel()) if starts[i] < hi_char and starts[i + 1] > lo_char]
    assert any(c["token_start"] <= evidence[-1] and evidence[0] < c["token_end"] for c in result["cited"]), \
        (evidence, result["cited"])
