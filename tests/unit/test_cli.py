"""The ``ltri-rag`` command line (``ltri_rag.cli``), run in process through ``main(argv)`` on a tiny random model saved
to disk (seconds): every command's ``--help``, usage errors (exit 2), runtime errors (exit 1, one line on stderr),
``--json`` output, a failed ingest leaving the store as it was; one subprocess run for the real exit code; and one slow
test of ``ltri-rag demo`` on the real Qwen2.5-Coder-0.5B, whose answers must be right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ltri_rag.cli import main
from ltri_rag.cli.demo import demo_documents, demo_questions, is_correct
from ltri_rag.cli.documents import pdf_available
from tests.real_model import QWEN_GGUF
from tests.unit.tiny_models import tiny_model
from tests.unit.tiny_tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("ingest", "ask", "chat", "ls", "rm", "stats", "verify", "demo", "inspect", "bench", "precompile")
TINY_CONFIG = """\
num_sink_tokens = 8
local_window = 32
chunk_size = 16
budget = 64
page_size = 8
evict_stride = 4
span_min_len = 2
span_max_len = 12
"""
FOX = "The quick brown fox jumps over the lazy dog near the river bank every morning at seven."
PARIS = "Paris is the capital of France. The Seine flows through it from east to west."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama model + character tokenizer saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text(TINY_CONFIG)
    return path


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "fox.txt").write_text(FOX)
    (folder / "sub" / "paris.md").write_text(PARIS)
    (folder / "skipped.csv").write_text("a,b\n")  # not a supported type: left out of folder walks
    return folder


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``ltri-rag argv`` in process (argparse's exits included)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def model_args(tiny_dir: Path, config_file: Path, store: Path) -> list[str]:
    return ["--store", str(store), "--model", str(tiny_dir), "--config", str(config_file), "--device", "cpu"]


def snapshot(store: Path) -> dict[str, int]:
    """Every file of the store folder with its size (the writer lock excluded)."""
    return {str(p.relative_to(store)): p.stat().st_size for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != "writer.lock"}


# ------------------------------------------------------------------------------------------------- help / usage
@pytest.mark.parametrize("command", (None, *COMMANDS))
def test_every_command_has_help(capsys: pytest.CaptureFixture[str], command: str | None) -> None:
    code, out, _ = run(capsys, *([command] if command else []), "--help")
    assert code == 0
    assert out.startswith(f"usage: ltri-rag {command or ''}".rstrip()), out[:200]
    assert "--store" in out and "--json" in out


@pytest.mark.parametrize("argv,message", [
    ((), "the following arguments are required: COMMAND"),
    (("frobnicate",), "invalid choice: 'frobnicate'"),
    (("ask",), "the following arguments are required: question"),
    (("rm",), "the following arguments are required: ID"),
    (("ingest",), "the following arguments are required: PATH"),
    (("ask", "q", "--max-new-tokens", "0"), "argument --max-new-tokens: expected a positive integer, got 0"),
    (("ask", "q", "-k", "many"), "argument -k: expected a positive integer, got 'many'"),
    (("ask", "q", "--filter", "novalue"), "argument --filter: expected KEY=VALUE, got 'novalue'"),
    (("ask", "q", "--temperature", "-1"), "argument --temperature: expected a number >= 0"),
    (("ask", "q", "--dtype", "int8"), "argument --dtype: invalid choice: 'int8'"),
    (("ask", "q", "--config", "/nonexistent/ltri.toml"), "config file not found: /nonexistent/ltri.toml"),
    (("ls", "extra"), "unrecognized arguments: extra"),
    (("ls", "--model", "x"), "unrecognized arguments: --model x"),  # ls needs no model
    (("precompile", "--workers", "0"), "argument --workers: expected a positive integer, got 0"),
    (("precompile", "--gpu", "-1"), "argument --gpu: expected an integer >= 0"),
])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err, err
    assert "usage: ltri-rag" in err


@pytest.mark.parametrize("content,message", [
    ("local_windw = 64\n", "unknown LtriConfig key 'local_windw' (did you mean 'local_window'?)"),
    ("local_window = 'big'\n", "local_window must be an int, got 'big'"),
    ("local_window = [\n", "is not valid TOML"),
    ("mode = 'fast'\n", "mode must be one of"),
])
def test_bad_config_file_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str,
                                message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(content)
    code, _, err = run(capsys, "ask", "q", "--config", path)
    assert code == 2 and "argument --config:" in err and message in err, err


def test_yaml_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text("budget: 128\nspan_max_len: 16\nbogus: 1\n")
    code, _, err = run(capsys, "ask", "q", "--config", path)
    assert code == 2 and "unknown LtriConfig key 'bogus'" in err


def test_fast_flag_sets_the_preset_under_the_config_file() -> None:
    from ltri_rag.cli.app import build_parser
    from ltri_rag.cli.runtime import config_overrides
    from ltri_rag.config import FAST_PRESET

    assert build_parser().parse_args(["ask", "q", "--fast"]).fast
    assert not build_parser().parse_args(["ask", "q"]).fast
    assert config_overrides(None, True) == FAST_PRESET
    assert config_overrides({"budget": 64}, False) == {"budget": 64}
    assert config_overrides({"budget": 64, "decode_retrieval_stride": 2}, True) == {
        "budget": 64, "decode_retrieval_stride": 2}


def test_subprocess_exit_code(tmp_path: Path) -> None:
    """The real process (``python -m ltri_rag.cli``): a runtime error exits 1 with one line on stderr, no traceback
    (usage errors are argparse's ``SystemExit(2)``, checked in process above)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run_ = subprocess.run([sys.executable, "-m", "ltri_rag.cli", "ls", "--store", str(tmp_path / "none")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert run_.returncode == 1, run_.stderr
    assert run_.stderr.startswith("ltri-rag: error: no store at") and run_.stderr.count("\n") == 1, run_.stderr
    assert run_.stdout == ""


# ------------------------------------------------------------------------------------------------- runtime errors
@pytest.mark.parametrize("command", [("ls",), ("stats",), ("verify",), ("rm", "x"), ("ask", "why?")])
def test_missing_store_is_a_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           command: tuple[str, ...]) -> None:
    code, out, err = run(capsys, *command, "--store", tmp_path / "absent")
    assert code == 1 and out == ""
    assert err.startswith("ltri-rag: error: no store at") and err.count("\n") == 1, err
    assert not (tmp_path / "absent").exists()


def test_failed_ingest_into_a_new_store_creates_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                        docs: Path, tiny_dir: Path, config_file: Path) -> None:
    store = tmp_path / "store"
    (docs / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    code, _, err = run(capsys, "ingest", docs / "fox.txt", docs / "latin1.txt", docs / "gone.txt",
                       *model_args(tiny_dir, config_file, store))
    assert code == 1 and err.count("\n") == 1, err
    assert "latin1.txt: not valid UTF-8 (byte 0xe9 at offset 3)" in err
    assert "no such file or folder:" in err and "gone.txt" in err and "nothing was ingested" in err
    assert not store.exists()


def test_store_in_the_way_of_other_files(capsys: pytest.CaptureFixture[str], docs: Path, tiny_dir: Path,
                                         config_file: Path) -> None:
    code, _, err = run(capsys, "ingest", docs / "fox.txt", *model_args(tiny_dir, config_file, docs))
    assert code == 1 and "exists and is not an ltri-rag store" in err
    assert sorted(p.name for p in docs.iterdir()) == ["fox.txt", "skipped.csv", "sub"]


@pytest.mark.skipif(pdf_available(), reason="pypdf is installed: PDFs are read")
def test_pdf_without_parser_names_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_dir: Path,
                                           config_file: Path) -> None:
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4\n")
    code, _, err = run(capsys, "ingest", pdf, *model_args(tiny_dir, config_file, tmp_path / "store"))
    assert code == 1 and f"{pdf}: reading PDF files needs the pypdf package" in err


def test_bad_model_is_a_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path, docs: Path,
                                       config_file: Path) -> None:
    code, _, err = run(capsys, "ingest", docs, "--store", tmp_path / "s", "--model", "no-such-model", "--offline")
    assert code == 1 and "cannot load model 'no-such-model': unknown model" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------- the commands
def test_commands_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path, docs: Path, tiny_dir: Path,
                             config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    margs = model_args(tiny_dir, config_file, store)

    code, out, err = run(capsys, "ingest", docs, *margs, "--json")
    assert code == 0, err
    ingested = json.loads(out)
    assert ingested["added"] == ["docs/fox.txt", "docs/sub/paris.md"] and ingested["tokens"] == len(FOX) + len(PARIS)
    assert json.loads((store / "ltri-rag.json").read_text())["model"] == str(tiny_dir)

    # unchanged files are skipped; a glob pattern gives the same ids
    code, out, _ = run(capsys, "ingest", f"{docs}/**/*.md", "--json", *margs)
    assert code == 0 and json.loads(out)["skipped"] == ["docs/sub/paris.md"]

    code, out, _ = run(capsys, "ls", "--store", store, "--json")
    listed = json.loads(out)
    assert [(d["doc_id"], d["tokens"]) for d in listed] == [("docs/fox.txt", len(FOX)), ("docs/sub/paris.md",
                                                                                          len(PARIS))]
    assert listed[0]["metadata"]["source"].endswith("fox.txt")
    code, out, _ = run(capsys, "ls", "--store", store)
    assert code == 0 and "docs/sub/paris.md" in out and "2 document(s)" in out

    code, out, _ = run(capsys, "--store", store, "stats", "--json")  # options before the command work too
    stats = json.loads(out)
    assert stats["documents"] == 2 and stats["tokens"] == len(FOX) + len(PARIS) and stats["model"] == str(tiny_dir)
    assert stats["config"]["local_window"] == 32 and stats["collections"] == {"default": 2}

    code, out, _ = run(capsys, "verify", "--store", store, "--json")
    assert code == 0 and json.loads(out)["clean"] is True

    # ask: the model comes from the store's note (no --model)
    code, out, err = run(capsys, "ask", "Where does the Seine flow?", "--store", store, "--max-new-tokens", "5",
                         "-k", "2", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert isinstance(answer["answer"], str) and 1 <= len(answer["spans"]) <= 2
    span = answer["spans"][0]
    assert span["doc_id"] in ("docs/fox.txt", "docs/sub/paris.md") and 0 <= span["char_start"] < span["char_end"]
    source = FOX if span["doc_id"] == "docs/fox.txt" else PARIS
    assert 0.0 <= span["score"] <= 1.0 and span["text"] == source[span["char_start"]:span["char_end"]]
    assert answer["generated_tokens"] <= 5 and answer["memory_tokens"] == len(FOX) + len(PARIS)
    # a filter that selects no document: refused, naming it (it used to answer from no memory at all)
    code, _, err = run(capsys, "ask", "Where does the Seine flow?", "--store", store, "--max-new-tokens", "3",
                       "--filter", "source=nowhere")
    assert code == 1 and "the filter {'source': 'nowhere'} select(s) no documents" in err
    code, out, _ = run(capsys, "ask", "What jumps?", "--store", store, "--max-new-tokens", "3", "--fast")
    assert code == 0 and "Sources:" in out and "chars " in out and "score " in out and "served from memory" in out

    # a store made with one config refuses a --config that changes stored data, naming the key
    other = tmp_path / "other.toml"
    other.write_text("span_max_len = 20\n")
    code, _, err = run(capsys, "ask", "q", "--store", store, "--config", other)
    assert code == 1 and "differing: config.span_max_len" in err and err.count("\n") == 1

    # chat: turns answered and stored in the chat collection
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("My locker code is 4711.\n\n/sources\nAnd?\n"))
    code, out, err = run(capsys, "chat", "--store", store, "--session", "s1", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    turns = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [t["question"] for t in turns] == ["My locker code is 4711.", "And?"] and turns[0]["session"] == "s1"
    code, out, _ = run(capsys, "ls", "--store", store, "--collection", "chat:s1", "--json")
    assert [d["doc_id"] for d in json.loads(out)] == ["turn-00000", "turn-00001"]
    # a turn removed: the next one comes after the highest (a count would overwrite turn-00001)
    assert run(capsys, "rm", "turn-00000", "--store", store, "--collection", "chat:s1")[0] == 0
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("Third?\n"))
    assert run(capsys, "chat", "--store", store, "--session", "s1", "--max-new-tokens", "2", "--json")[0] == 0
    code, out, _ = run(capsys, "ls", "--store", store, "--collection", "chat:s1", "--json")
    assert [d["doc_id"] for d in json.loads(out)] == ["turn-00001", "turn-00002"]
    # asked over a collection that holds nothing: refused, naming it
    code, _, err = run(capsys, "ask", "What jumps?", "--store", store, "--collection", "defualt")
    assert code == 1 and "the collection 'defualt' select(s) no documents" in err

    # rm: an unknown id deletes nothing; known ids go
    before = snapshot(store)
    code, _, err = run(capsys, "rm", "docs/fox.txt", "nope", "--store", store)
    assert code == 1 and "not in collection 'default': nope" in err and "nothing was deleted" in err
    assert snapshot(store) == before
    code, out, _ = run(capsys, "rm", "docs/fox.txt", "--store", store, "--json")
    assert code == 0 and json.loads(out) == {"deleted": ["docs/fox.txt"], "collection": "default"}
    code, out, _ = run(capsys, "ls", "--store", store, "--collection", "default", "--json")
    assert [d["doc_id"] for d in json.loads(out)] == ["docs/sub/paris.md"]
    code, out, _ = run(capsys, "verify", "--store", store)
    assert code == 0 and "clean" in out


def test_failed_ingest_leaves_the_store_unchanged(capsys: pytest.CaptureFixture[str], tmp_path: Path, docs: Path,
                                                  tiny_dir: Path, config_file: Path) -> None:
    store = tmp_path / "store"
    margs = model_args(tiny_dir, config_file, store)
    assert run(capsys, "ingest", docs / "fox.txt", *margs)[0] == 0
    before = snapshot(store)
    code, out, _ = run(capsys, "ls", "--store", store, "--json")
    listed = out
    (docs / "binary.txt").write_bytes(b"ok\xff\xfe")
    (docs / "empty.md").write_text("  \n")
    (docs / "fox.txt").write_text(FOX + " Changed.")  # would be replaced, if the ingest went ahead
    for bad in ([docs / "sub" / "paris.md", docs / "missing.txt"], [docs / "sub" / "paris.md", docs / "binary.txt"],
                [docs / "fox.txt", docs / "empty.md"], [docs / "fox.txt", tmp_path / "nothing-*.txt"],
                [docs / "skipped.csv"]):
        code, _, err = run(capsys, "ingest", *bad, *margs)
        assert code == 1 and err.startswith("ltri-rag: error:") and err.count("\n") == 1, err
        assert snapshot(store) == before, bad
    assert "holds no text" in run(capsys, "ingest", docs / "empty.md", *margs)[2]
    assert "unsupported file type '.csv'" in run(capsys, "ingest", docs / "skipped.csv", *margs)[2]
    assert run(capsys, "ls", "--store", store, "--json")[1] == listed


def test_same_id_from_two_inputs_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_dir: Path,
                                            config_file: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "notes.txt").write_text(f"notes of {folder}")
    code, _, err = run(capsys, "ingest", tmp_path / "a" / "notes.txt", tmp_path / "b" / "notes.txt",
                       *model_args(tiny_dir, config_file, tmp_path / "store"))
    assert code == 1 and "would both get the id 'notes.txt'" in err


def test_verify_reports_and_repairs(capsys: pytest.CaptureFixture[str], tmp_path: Path, docs: Path, tiny_dir: Path,
                                    config_file: Path) -> None:
    store = tmp_path / "store"
    assert run(capsys, "ingest", docs / "fox.txt", *model_args(tiny_dir, config_file, store))[0] == 0
    (store / "kv" / "stray.safetensors").write_bytes(b"left by a crash")
    code, out, _ = run(capsys, "verify", "--store", store, "--json")
    report = json.loads(out)
    assert code == 1 and report["clean"] is False and report["orphan_files"] == ["stray.safetensors"]
    code, out, _ = run(capsys, "verify", "--store", store, "--repair")
    assert code == 0 and "now clean" in out
    assert run(capsys, "verify", "--store", store)[0] == 0


# ------------------------------------------------------------------------------------------------- demo
def test_demo_data_is_packaged_and_questions_point_inside() -> None:
    docs = demo_documents()
    assert sorted(docs) == ["emma", "northanger_abbey", "persuasion"]
    for q in demo_questions():
        text = docs[q.document]
        where = text.find(q.evidence)
        assert where > len(text) // 2, (q.question, where, len(text))  # the answer lies in the second half
        assert is_correct(q.evidence, q.expect)
    assert is_correct("It was sixteen miles.", ("sixteen", "16")) and not is_correct("sixteenth", ("sixteen",))


QWEN = QWEN_GGUF  # see tests/real_model.py


@pytest.mark.slow
@pytest.mark.skipif(not QWEN.is_file() and not os.environ.get("CI"), reason=f"model file {QWEN} not fetched")
def test_demo_answers_correctly_on_qwen(capsys: pytest.CaptureFixture[str]) -> None:
    """``ltri-rag demo`` on the real Qwen2.5-Coder-0.5B (CPU): every answer holds the expected fact."""
    code, out, err = run(capsys, "demo", "--model", QWEN, "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(out)
    with capsys.disabled():
        print(f"\n[demo] load {result['load_model_s']:.0f} s, ingest {result['tokens']} tokens in "
              f"{result['ingest_s']:.0f} s, total {result['total_s']:.0f} s")
        for q in result["questions"]:
            print(f"[demo] {q['question']} -> {q['answer']!r} (cited {[s['doc_id'] for s in q['spans']]}, "
                  f"{q['retrieve_s'] + q['answer_s']:.0f} s)")
    assert [q["correct"] for q in result["questions"]] == [True] * len(result["questions"]), result["questions"]
    assert result["correct"] == len(demo_questions())


# ------------------------------------------------------------------------------------------------- precompile
def test_precompile_without_cuda_is_a_clear_error(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run(capsys, "precompile")
    assert code == 1 and out == ""
    assert "no CUDA device here" in err


def test_precompile_reports_what_it_compiled(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    import torch
    from ltri_rag.kernels import precompile

    calls = []

    class Job:
        variants = [("sort_fill", {}), ("chunk_top", {})]
        processes = [object()]

    def fake(device, *, tail, workers, progress):
        calls.append((device, tail, workers, progress))
        return Job() if len(calls) == 1 else None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(precompile, "precompile_sort_kernels", fake)
    monkeypatch.setattr(precompile, "cache_dir", lambda: tmp_path)
    code, out, _ = run(capsys, "precompile", "--gpu", "1", "--workers", "3")
    assert code == 0 and "compiled 2 selection kernels" in out and str(tmp_path) in out
    code, out, _ = run(capsys, "precompile", "--json")
    report = json.loads(out)
    assert code == 0 and isinstance(report.pop("seconds"), (int, float))
    assert report == {"compiled": 0, "cache_dir": str(tmp_path), "processes": 0}
    assert calls == [(1, 64, 3, True), (None, 64, None, False)]
    code, _, err = run(capsys, "precompile", "--gpu", "2")
    assert code == 1 and "--gpu 2 is not a CUDA device here (there are 2)" in err


def test_bad_stores_and_option_values_give_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.sqlite").write_text("garbage")
    code, _, err = run(capsys, "ls", "--store", bad)
    assert code == 1 and err.count("\n") == 1 and "not a database" in err
    code, _, err = run(capsys, "chat", "--store", bad, "--history", "-1")
    assert code == 2 and "expected an integer >= 0, got -1" in err
    code, _, err = run(capsys, "ask", "q", "--store", bad, "--seed", str(1 << 70))
    assert code == 2 and "expected a seed below 2**63" in err
