"""The KV-memory benchmark's corpus: whole documents from the three real sources in turn, up to a token count, and
SQuAD questions only of articles that are in it; and one run of its KVMemory half on a tiny random model."""

from __future__ import annotations

import pytest

from benchmarks.bench_memory import answered, build_corpus, corpus_sources, pick_questions
from benchmarks.tasks import data_dir
from tests.unit.tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def sources():
    try:
        root = data_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return corpus_sources(root)


def test_corpus_takes_whole_documents_in_turn_up_to_the_size(sources) -> None:
    essays, chapters, articles, _ = sources
    assert len(essays) == 49 and len(chapters) > 250 and len(articles) == 48
    tok = tiny_tokenizer()
    docs, tokens = build_corpus(tok, (articles, essays, chapters), 120_000)
    assert tokens >= 120_000
    assert sum(len(tok(t, add_special_tokens=False)["input_ids"]) for _, t in docs) == tokens
    assert [d for d, _ in docs[:3]] == [articles[0][0], essays[0][0], chapters[0][0]]
    assert len({d for d, _ in docs}) == len(docs)
    assert tokens - len(tok(docs[-1][1], add_special_tokens=False)["input_ids"]) < 120_000  # stops at the size
    again, _ = build_corpus(tok, (articles, essays, chapters), 120_000)
    assert again == docs


def test_corpus_cycles_with_distinct_ids_when_it_runs_out(sources) -> None:
    essays, _, articles, _ = sources
    tok = tiny_tokenizer()
    small = (articles[:1], essays[:1])
    docs, _ = build_corpus(tok, small, 5 * sum(len(t) for _, t in articles[:1] + essays[:1]))
    ids = [d for d, _ in docs]
    assert len(set(ids)) == len(ids) and any("#copy2" in d for d in ids)


def test_questions_come_from_articles_in_the_corpus(sources) -> None:
    essays, chapters, articles, squad = sources
    docs, _ = build_corpus(tiny_tokenizer(), (articles, essays, chapters), 60_000)
    present = {d for d, _ in docs if d.startswith("squad/")}
    questions = pick_questions(squad, docs, 8, seed=0)
    assert len(questions) == 8 and all(article in present for article, _, _ in questions)
    assert questions == pick_questions(squad, docs, 8, seed=0)
    text = {d: t for d, t in docs}
    for article, _, answers in questions:
        assert answered(text[article], answers)  # the answer is in its article's text


def test_kvmemory_run_times_the_store_within_the_ingest(tmp_path) -> None:
    """One tiny run of the KVMemory half: the ingest is timed with its store writes apart, and every question gets a
    row (tiny random model: the numbers say nothing of quality)."""
    from benchmarks.bench_memory import bench_kvmemory
    from ltri_rag import LtriConfig
    from tests.unit.tiny_models import tiny_model

    docs = [("a", "The river flows past the old mill every spring."), ("b", "Paris is the capital of France.")]
    config = LtriConfig(num_sink_tokens=4, local_window=16, chunk_size=8, budget=12, page_size=5, evict_stride=4,
                        span_min_len=2, span_max_len=6)
    out = bench_kvmemory(tiny_model("llama"), tiny_tokenizer(), config, docs, [("b", "What is the capital?", ("Paris",))],
                         tmp_path / "mem", max_new_tokens=2)
    assert 0 < out["ingest_store_s"] < out["ingest_s"]
    assert out["stored_tokens"] == sum(len(text) for _, text in docs)  # one tiny-tokenizer token per character
    assert len(out["questions"]) == 1 and out["questions"][0]["retrieve_s"] > 0
