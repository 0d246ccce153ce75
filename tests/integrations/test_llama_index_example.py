"""examples/llama_index_query.py runs end to end (a tiny random model saved to disk, so it is fast; the real-model
pipeline is tested in test_llama_index_qwen.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.unit.tiny_models import tiny_model
from tests.unit.tiny_tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_example_answers_and_lists_its_sources(tmp_path) -> None:
    model_dir, docs = tmp_path / "tiny", tmp_path / "docs"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    docs.mkdir()
    (docs / "fox.txt").write_text("The quick brown fox jumps over the lazy dog near the river bank every morning.")
    (docs / "paris.txt").write_text("Paris is the capital of France. The Seine flows through it.")
    store = tmp_path / "store"
    command = [sys.executable, str(ROOT / "examples" / "llama_index_query.py"), "--model", str(model_dir),
               "--docs", str(docs), "--question", "Where does the Seine flow?", "--max-new-tokens", "4",
               "--store", str(store), "--compare"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "Q: Where does the Seine flow?" in out and "A (KV memory):" in out and "A (text RAG):" in out, out
    assert "served from memory" in out and (" fox chars " in out or " paris chars " in out), out
    assert any(store.iterdir())  # the memory is kept for the next run (--store)
