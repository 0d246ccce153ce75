"""The retrieval tracer: needle token ranges from offsets, and what each layer retrieved (tiny model, CPU)."""

from __future__ import annotations

import argparse

from benchmarks.evaluate import SYSTEMS, format_prompt, prompt_text
from benchmarks.long_tasks import make_sample
from benchmarks.trace_retrieval import needle_tokens, render, trace
from tests.unit.tiny_models import tiny_model
from tests.unit.tiny_tokenizer import tiny_tokenizer


def _args(budget: int) -> argparse.Namespace:
    return argparse.Namespace(window=64, budget=budget, chunk=128, sinks=8, prompt_format="auto")


def test_needle_ranges_are_the_value_tokens_of_the_real_prompt() -> None:
    tokenizer = tiny_tokenizer()
    sample = make_sample("niah_multikey", tokenizer, 1500, 0.4, 3)
    text, chat = prompt_text(tokenizer, sample, sample.context, "auto")
    ids, needles = needle_tokens(tokenizer, text, not chat, sample.context)
    assert ids.tolist() == format_prompt(tokenizer, sample, sample.context, "auto").tolist()  # the same prompt
    assert len(needles) == 4 and sum(n["value"] in sample.answers for n in needles) == 1
    for n in needles:
        assert tokenizer.decode(ids[n["tokens"][0]:n["tokens"][1]]) == n["value"]
        assert tokenizer.decode(ids[n["key_tokens"][0]:n["key_tokens"][1]]) == n["key"]


def test_a_budget_covering_the_memory_retrieves_every_needle_in_every_layer() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    sample = make_sample("niah_multikey", tokenizer, 1500, 0.2, 1)
    full = trace(model, tokenizer, sample, SYSTEMS["ltri"], _args(budget=4096))
    assert full["num_global_layers"] == 2
    outside = [n for n in full["needles"] if not n["in_window"]]
    assert outside, "the needles should have left the 64-token window"
    for n in outside:
        assert n["layers_full_question"] == 2 and n["layers_full_first_token"] in (0, 2)
        assert n["layers_value_with_key"] == n["layers_full_first_token"]  # everything retrieved: the key too
        assert all(v["spans"] for v in n["per_layer"].values())  # stored spans cover the value
        steps = n["layers_full_by_answer_token"]  # the question's retrieval, then one per answer token read
        assert len(steps) == len(full["answer_tokens"]) and steps[0] == n["layers_full_question"]
        assert set(steps) <= {0, 2} and steps[1:2] == [n["layers_full_first_token"]][:len(steps) - 1]
    small = trace(model, tokenizer, sample, SYSTEMS["ltri"], _args(budget=16))
    for n in small["needles"]:  # 16 tokens cannot hold all four 7-digit values in both layers
        assert all(0.0 <= v["question"] <= 1.0 for v in n["per_layer"].values())
    assert sum(n["layers_full_question"] for n in small["needles"]) < sum(n["layers_full_question"]
                                                                         for n in full["needles"])
    assert "needle" in render(full)
