"""examples/chatbot_memory.py: on the real Qwen2.5-Coder-0.5B (CPU, slow), in-process with the session's cached model,
a fact said in turn 1 is answered 50 exchanges later from the KV memory (the prompt holds only the question); the
command line on a tiny random model saved to disk (fast)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from ltri_rag import KVMemory, LtriConfig
from tests.integrations.conftest import essays_dir, needs_qwen, qwen
from tests.unit.tiny_models import tiny_model
from tests.unit.tiny_tokenizer import tiny_tokenizer

TINY_CONFIG = LtriConfig(mode="ltri", num_sink_tokens=4, local_window=16, chunk_size=8, budget=12, page_size=5,
                         evict_stride=4, span_min_len=2, span_max_len=6)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "chatbot_memory.py"


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chatbot_memory", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@needs_qwen
def test_chatbot_recalls_a_fact_said_fifty_exchanges_earlier(cpu_threads, tmp_path) -> None:
    chatbot = example()
    model, tokenizer = qwen()
    with KVMemory.create(tmp_path / "chat", model, tokenizer, chatbot.CONFIG) as memory:
        answer, history = chatbot.play(memory, essays_dir(), turns=50)
        messages = history.messages
    assert "7319" in answer.content, answer.content
    meta = answer.response_metadata
    # 52 exchanges stored: the fact, 50 of filler in 5 documents, the question and its answer; the answer read the
    # 6 documents before it from the memory
    assert len(messages) == 104 and messages[0].content == chatbot.FACT and messages[-1].content == answer.content
    assert len(meta["documents"]) == 6 and meta["memory_tokens"] > 1000
    assert meta["prompt_tokens"] < 120 and "7319" not in chatbot.SYSTEM + chatbot.QUESTION  # not in the prompt
    assert any("7319" in span["text"] for span in meta["spans"]), meta["spans"]  # the fact among the recalled spans


def test_command_line_on_a_tiny_model(tmp_path, monkeypatch, capsys) -> None:
    model_dir, folder = tmp_path / "tiny", tmp_path / "texts"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    folder.mkdir()
    (folder / "a.txt").write_text(" ".join(f"Sentence number {i} is long enough to be a filler turn here." for i in
                                           range(8)))
    chatbot = example()
    monkeypatch.setattr(chatbot, "CONFIG", TINY_CONFIG)
    monkeypatch.setattr(sys, "argv", ["chatbot_memory.py", "--model", str(model_dir), "--turns", "5", "--batch", "2",
                                      "--filler", str(folder)])
    chatbot.main()
    out = capsys.readouterr().out
    assert f"turn 1: {chatbot.FACT}\n... 5 exchanges ...\nQ: {chatbot.QUESTION}\nA: " in out, out
    assert "served from memory" in out and "recalled spans:" in out and "turn-0000000" in out, out
    with pytest.raises(ValueError, match="turns must be an int from 0 to 8 .* got turns=9, batch=1"):
        chatbot.filler(folder, 9)
    with pytest.raises(ValueError, match="got turns=2, batch=0"):
        chatbot.filler(folder, 2, 0)
    assert [len(m) for m in chatbot.filler(folder, 5, 2)] == [4, 4, 2]
