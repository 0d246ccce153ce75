"""The RULER-style long-context task generators (benchmarks/long_tasks.py) on real text.

Two offline tokenizers: a byte-level BPE trained here on a slice of the essays (sub-word pieces like a real LM
tokenizer's, no special tokens) and the repo's character-level tiny tokenizer (adds ``<s>``). The data tests need the
data directory (``LTRI_DATA_DIR`` or ``../shared/data``); they are skipped without it, except under CI.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.unit.tiny_tokenizer import tiny_tokenizer  # isort: skip  (imports ltri_rag before transformers)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from benchmarks.long_tasks import ALL_TASKS, LONG_ANSWER_TASKS, TASKS, TaskSample, make_sample, max_new_tokens, score
from benchmarks.tasks import data_dir

LENGTHS = (2048, 8192)
LONG_ONLY = {"niah_longvalue48"}  # 48 needles take more than 2,048 tokens of the character-level tokenizer


def lengths_of(task: str) -> tuple[int, ...]:
    """The prompt lengths at which ``task``'s samples are built here."""
    return tuple(n for n in LENGTHS if task not in LONG_ONLY or n >= 8192)
DEPTHS = (0.0, 0.5, 1.0)
TOKENIZERS = ("bpe", "char")


def _data_root() -> Path | None:
    try:
        root = data_dir()
    except FileNotFoundError:
        return None
    needed = [root / "squad" / "squaddev_v1.1.json", root / "austen" / "emma.txt"]
    return root if all(p.is_file() for p in needed) else None


@pytest.fixture(scope="module")
def root() -> Path:
    found = _data_root()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("data directory (LTRI_DATA_DIR or ../shared/data) missing under CI")
        pytest.skip("data directory (LTRI_DATA_DIR or ../shared/data) not present")
    return found


def _bpe_tokenizer(root: Path) -> PreTrainedTokenizerFast:
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((root / "paul_graham_essays").glob("*.txt")))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    chunks = [text[i:i + 2000] for i in range(0, 200_000, 2000)]
    backend.train_from_iterator(chunks, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="module")
def tokenizers(root: Path) -> dict:
    return {"bpe": _bpe_tokenizer(root), "char": tiny_tokenizer()}


@pytest.fixture(scope="module")
def samples(root: Path, tokenizers: dict) -> dict:
    """Every (tokenizer, task, length, depth) at seed 7."""
    return {(name, task, length, depth): make_sample(task, tok, length, depth, seed=7, root=root)
            for name, tok in tokenizers.items() for task in ALL_TASKS for length in lengths_of(task)
            for depth in DEPTHS}


@pytest.fixture(scope="module")
def squad_paragraph_of(root: Path) -> dict:
    data = json.loads((root / "squad" / "squaddev_v1.1.json").read_text(encoding="utf-8"))["data"]
    return {" ".join(qa["question"].split()): " ".join(p["context"].split())
            for article in data for p in article["paragraphs"] for qa in p["qas"]}


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("task", ALL_TASKS)
def test_length_needles_and_question(samples: dict, tokenizers: dict, squad_paragraph_of: dict, name: str,
                                     task: str) -> None:
    tok = tokenizers[name]
    for length in lengths_of(task):
        for depth in DEPTHS:
            s: TaskSample = samples[name, task, length, depth]
            where = f"{name} {task} {length} {depth}"
            assert s.task == task and s.depth == depth and s.seed == 7
            assert s.num_tokens == len(tok(s.prompt)["input_ids"]), where
            assert 0.95 * length <= s.num_tokens <= length + 64, (where, s.num_tokens)
            assert s.prompt == s.instruction + s.context + s.question + s.answer_prefix
            assert s.metric == ("any" if task == "qa_squad" else "all")
            assert s.answers and all(a in s.context for a in s.answers), where
            assert not any(a.lower() in s.question.lower() for a in s.answers), where
            assert len(s.context) > 0.8 * (len(s.prompt))  # the haystack is most of the prompt
            if task == "qa_squad":
                gold = squad_paragraph_of[s.question.split("Question: ")[-1]]
                assert gold in s.context, where
                assert s.context.startswith("Document 1:\n")


def test_needle_counts(samples: dict) -> None:
    needle = "One of the special magic numbers for "
    for name in TOKENIZERS:
        get = lambda task: samples[name, task, 8192, 0.5]  # noqa: E731
        assert get("niah_single").context.count(needle) == 1
        for task in ("niah_multikey", "niah_multivalue", "niah_multiquery"):
            assert get(task).context.count(needle) == 4, task
        keys = {line.split(needle)[1].split(" is:")[0] for line in get("niah_multikey").context.split("\n")
                if needle in line}
        assert len(keys) == 4  # one asked key and three distractors
        mv = get("niah_multivalue")
        assert len(set(mv.answers)) == 4 and mv.context.count(needle + mv.question.split(" for ")[1].split()[0]) == 4
        assert len(get("niah_multiquery").answers) == 2
        vt = get("vt")
        assert vt.context.count("VAR ") == 5 + 4 and len(vt.answers) == 5  # 5 statements, 4 of them hops
        assert len(get("book_austen").answers) == 1 and len(get("book_austen").answers[0]) == 7
        lv = get("niah_longvalue")
        assert len(set(lv.answers)) == 16 and lv.context.count(needle) == 16
        lv48 = get("niah_longvalue48")
        assert len(set(lv48.answers)) == 48 and lv48.context.count(needle) == 48


@pytest.mark.parametrize("length", LENGTHS)
def test_niah_single_needle_at_depth(samples: dict, length: int) -> None:
    for name in TOKENIZERS:
        for depth in DEPTHS:
            s = samples[name, "niah_single", length, depth]
            at = s.context.index("One of the special magic numbers")
            assert abs(at / len(s.context) - depth) <= 0.1, (name, depth, at / len(s.context))


def test_gold_paragraph_and_book_fact_follow_depth(samples: dict) -> None:
    for name in TOKENIZERS:
        for depth in DEPTHS:
            qa = samples[name, "qa_squad", 8192, depth]
            at = qa.context.index(qa.answers[0])
            assert abs(at / len(qa.context) - depth) <= 0.25, (name, depth)
            book = samples[name, "book_austen", 8192, depth]
            at = book.context.index(book.answers[0])
            assert abs(at / len(book.context) - depth) <= 0.1, (name, depth)


def test_deterministic_and_seeded(root: Path, tokenizers: dict, samples: dict) -> None:
    tok = tokenizers["bpe"]
    for task in ALL_TASKS:
        n = lengths_of(task)[0]
        again = make_sample(task, tok, n, 0.5, seed=7, root=root)
        assert again == samples["bpe", task, n, 0.5], task
        other = make_sample(task, tok, n, 0.5, seed=8, root=root)
        assert set(other.answers) != set(again.answers), task
        assert other.prompt != again.prompt


def test_score(samples: dict) -> None:
    for task in ALL_TASKS:
        s = samples["bpe", task, lengths_of(task)[0], 0.5]
        assert score(" " + ", ".join(s.answers) + ".", s) == 1.0
        assert score(", ".join(a.upper() for a in s.answers), s) == 1.0  # case-insensitive
        assert score("", s) == 0.0
        assert score("I do not know.", s) == 0.0
        partial = score(f"It is {s.answers[-1]}.", s)
        assert partial == (1 / len(s.answers) if s.metric == "all" else 1.0), task
    mv = samples["bpe", "niah_multivalue", 2048, 0.5]
    assert score(" and ".join(mv.answers[:3]), mv) == 0.75


def test_render_swaps_the_context(samples: dict) -> None:
    for task in ALL_TASKS:
        s = samples["char", task, lengths_of(task)[0], 0.0]
        assert s.render(s.context) == s.prompt
        swapped = s.render("[retrieved chunks]")
        assert swapped == s.instruction + "[retrieved chunks]" + s.question + s.answer_prefix
        assert s.context not in swapped


def test_max_new_tokens() -> None:
    assert max_new_tokens("niah_single") >= 10
    assert max_new_tokens("niah_multivalue") >= 4 * max_new_tokens("niah_single") - 10
    for task in TASKS:
        assert 8 <= max_new_tokens(task) <= 64
    assert LONG_ANSWER_TASKS == ("niah_longvalue", "niah_longvalue48") and not set(LONG_ANSWER_TASKS) & set(TASKS)


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("task,stride", [("niah_longvalue", 64), ("niah_longvalue48", None)])
def test_long_answers_outlast_a_decode_eviction(samples: dict, tokenizers: dict, name: str, task: str,
                                                stride: int | None) -> None:
    """The point of the long-answer tasks: the full answer is longer than the decoded tokens after which the engine
    first evicts (``evict_stride``: 64, the default until session 34, for ``niah_longvalue``; the default for
    ``niah_longvalue48``), and the generation budget leaves room for all of it."""
    from ltri_rag import LtriConfig

    tok = tokenizers[name]
    s = samples[name, task, 8192, 0.5]
    answer_tokens = len(tok(" " + ", ".join(s.answers) + ".", add_special_tokens=False)["input_ids"])
    assert answer_tokens > (stride or LtriConfig().evict_stride), answer_tokens
    assert max_new_tokens(task) >= 1.2 * answer_tokens
    with pytest.raises(ValueError, match="niah_nope"):
        max_new_tokens("niah_nope")


@pytest.mark.parametrize("kwargs,shown", [
    ({"task": "niah_nope"}, "niah_nope"),
    ({"depth": -0.1}, "-0.1"),
    ({"depth": 1.5}, "1.5"),
    ({"depth": math.nan}, "nan"),
    ({"num_tokens": 0}, "0"),
    ({"num_tokens": 1024.5}, "1024.5"),
])
def test_bad_inputs_need_no_data(kwargs: dict, shown: str) -> None:
    args = {"task": "niah_single", "tokenizer": tiny_tokenizer(), "num_tokens": 1024, "depth": 0.5, "seed": 0,
            "root": Path("/nonexistent")}
    with pytest.raises(ValueError, match=shown):
        make_sample(**{**args, **kwargs})


@pytest.mark.parametrize("task", ALL_TASKS)
def test_too_short_for_the_needles(root: Path, tokenizers: dict, task: str) -> None:
    with pytest.raises(ValueError, match="num_tokens=100 "):
        make_sample(task, tokenizers["bpe"], 100, 0.5, seed=0, root=root)


def test_longer_than_the_source_text(root: Path, tokenizers: dict) -> None:
    """Past the end of the essays they repeat; past the end of a novel the next one follows."""
    tok = tokenizers["char"]  # one token a character: 700K tokens exceed the essays (~640K characters)
    s = make_sample("niah_single", tok, 700_000, 0.25, seed=1, root=root)
    assert 0.95 * 700_000 <= s.num_tokens <= 700_064 and s.answers[0] in s.context
    assert s.context.count(s.context[:300]) >= 2  # the essays came round again
    book = make_sample("book_austen", tok, 950_000, 0.5, seed=1, root=root)  # longer than any one novel
    assert 0.95 * 950_000 <= book.num_tokens <= 950_064 and book.answers[0] in book.context
    titles = ("EMMA\n", "MANSFIELD PARK\n", "NORTHANGER ABBEY\n", "Persuasion\n", "PRIDE AND PREJUDICE\n",
              "SENSE AND SENSIBILITY\n")
    assert sum(t in book.context for t in titles) >= 2  # went on into the next novel
