"""Seeded RULER-style long-context tasks over real text, with scoring.

Seven tasks (:data:`TASKS`), each one prompt of a requested token length with the facts to find planted at a
requested depth:

* ``niah_single``: one "special magic number" needle in Paul Graham's essays; ask for it.
* ``niah_multikey``: four needles with different keys (three are distractors); ask for one key's number.
* ``niah_multivalue``: four needles with the same key and different numbers; ask for all four.
* ``niah_multiquery``: four needles with different keys; ask for two keys' numbers in one question.
* ``vt``: variable tracking, a chain ``VAR A = 12345.`` then ``VAR B = VAR A.`` ... (four hops) spread through the
  essays; ask which variables hold the value.
* ``qa_squad``: a SQuAD v1.1 dev question; its gold paragraph among distractor paragraphs from other articles,
  listed as ``Document i:``.
* ``book_austen``: a made-up fact (a numbered box) planted in a Jane Austen novel; ask for the number.

One more task is kept out of :data:`TASKS` (so default grids stay what they were) and listed in
:data:`LONG_ANSWER_TASKS`:

* ``niah_longvalue``: sixteen needles with the same key and different numbers; ask for all sixteen. Its answer
  (~100-150 tokens) outlasted the engine's first eviction while decoding when ``LtriConfig.evict_stride`` was 64
  (its default until session 34) and, with ``decode_retrieval_stride`` > 1, reused a memory part across an
  eviction; the other tasks' answers (at most 48 tokens) end before the first decode-time eviction.
* ``niah_longvalue48``: the same with forty-eight numbers. Its answer (~400-450 tokens) outlasts the first
  decode-time eviction at the default ``evict_stride`` of 256 decoded tokens.

Text comes from the data directory of :func:`benchmarks.tasks.data_dir` (``paul_graham_essays/``, ``squad/``,
``austen/``). A sample is a pure function of ``(task, tokenizer, num_tokens, depth, seed)``.

Length: the haystack is filled up to the token budget left after the instruction, question and needles. Each source
text is tokenized once (offset mappings turn a token count into a character cut), the cut lands on a sentence end,
and the whole prompt is tokenized once at the end to check it (and to fill :attr:`TaskSample.num_tokens`); a prompt
outside ``[target - 4%, target + 48]`` is rebuilt with a corrected budget, which is rare.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.haystack import (
    CHAPTER,
    Tokenized,
    books_lower,
    count_tokens,
    cut_at_sentence,
    essays_lower,
    load_books,
    load_essays,
    load_squad,
    normalise,
    num_special_tokens,
    plant,
    squad_lengths,
    tokenize_prefix,
)
from benchmarks.tasks import data_dir

__all__ = ["ALL_TASKS", "LONG_ANSWER_TASKS", "TASKS", "TaskSample", "make_sample", "max_new_tokens", "score"]

TASKS: tuple[str, ...] = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "qa_squad",
                          "book_austen")
# answers that outlast decode-time evictions
LONG_ANSWER_TASKS: tuple[str, ...] = ("niah_longvalue", "niah_longvalue48")
ALL_TASKS: tuple[str, ...] = TASKS + LONG_ANSWER_TASKS

_MAX_NEW_TOKENS = {"niah_single": 12, "niah_multikey": 12, "niah_multivalue": 48, "niah_multiquery": 28, "vt": 40,
                   "qa_squad": 24, "book_austen": 12, "niah_longvalue": 192,
                   "niah_longvalue48": 576}
_METRIC = {"qa_squad": "any"}  # every other task: "all"

_NUM_NEEDLES = 4  # needles of the multi-needle NIAH tasks
# one key, this many values
_SAME_KEY_NEEDLES = {"niah_multivalue": _NUM_NEEDLES, "niah_longvalue": 16, "niah_longvalue48": 48}
_VT_HOPS = 4
_MIN_HAYSTACK = 64  # fewer haystack tokens than this left after the needles: num_tokens is too small
_LOW, _HIGH = 0.04, 48  # accepted prompt length: [target * (1 - _LOW), target + _HIGH]


@dataclass(frozen=True)
class TaskSample:
    """One prompt of a long-context task.

    The prompt is ``instruction + context + question + answer_prefix``; :meth:`render` builds the same layout
    around another context (e.g. retrieved chunks for a text-RAG baseline).

    Attributes:
        task: One of :data:`TASKS`.
        instruction: Task description, before the context.
        context: The long haystack with the planted needles (or the gold paragraph).
        question: The query, after the context.
        answer_prefix: Text that primes the answer (the prompt ends with it).
        answers: Strings the prediction should contain.
        metric: ``"all"`` (fraction of ``answers`` found) or ``"any"`` (1 if any is found).
        depth: Requested relative position of the (first) needle or of the gold paragraph in ``context``, in
            [0, 1]; the needle itself sits at the nearest sentence (or paragraph) boundary.
        seed: The seed the sample was drawn with.
        num_tokens: Length of :attr:`prompt` in tokens (``tokenizer(prompt)["input_ids"]``, special tokens
            included as the tokenizer adds them by default).
        query: The bare question, without instructions, for a retriever (text-RAG searches with it).
    """

    task: str
    instruction: str
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    metric: str
    depth: float
    seed: int
    num_tokens: int
    query: str = ""

    def render(self, context: str) -> str:
        """The prompt with ``context`` in place of :attr:`context`."""
        return self.instruction + context + self.question + self.answer_prefix

    @property
    def prompt(self) -> str:
        """The full prompt."""
        return self.render(self.context)


def max_new_tokens(task: str) -> int:
    """Tokens to generate for ``task``: room for the answer(s) with a little slack."""
    _check_task(task)
    return _MAX_NEW_TOKENS[task]


def score(prediction: str, sample: TaskSample) -> float:
    """Case-insensitive substring match of each answer in ``prediction`` (whitespace runs count as one space).

    ``"all"``: the fraction of answers found; ``"any"``: 1.0 if any answer is found, else 0.0.
    """
    pred = normalise(prediction)
    found = [normalise(a) in pred for a in sample.answers]
    if not found:
        return 0.0
    if sample.metric == "all":
        return sum(found) / len(found)
    if sample.metric == "any":
        return float(any(found))
    raise ValueError(f"unknown metric {sample.metric!r}")


def make_sample(task: str, tokenizer: Any, num_tokens: int, depth: float, seed: int, root: Path | None = None
                ) -> TaskSample:
    """One prompt of ``task`` with about ``num_tokens`` tokens and its needle(s) at relative ``depth``.

    Args:
        task: One of :data:`TASKS`.
        tokenizer: A Hugging Face tokenizer (fast ones are cut by offset mappings; others by decoding).
        num_tokens: Target prompt length in tokens; the prompt lands in ``[0.96 * num_tokens, num_tokens + 48]``.
        depth: Relative position in [0, 1] of the first needle (multi-needle tasks place the others at seeded
            random depths) or of the gold paragraph.
        seed: Seed of every random choice (keys, numbers, other needles' depths, start of the text, question).
        root: Data directory; defaults to :func:`benchmarks.tasks.data_dir`.

    Raises:
        ValueError: Unknown task, depth outside [0, 1], or ``num_tokens`` too small for the task's fixed text.
        FileNotFoundError: The data the task needs is missing.
    """
    _check_task(task)
    try:
        depth = float(depth)
    except (TypeError, ValueError):
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}") from None
    if not 0.0 <= depth <= 1.0:  # also rejects NaN
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens <= 0:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    root = Path(root) if root is not None else data_dir()
    rng = random.Random(f"{task}:{seed}")
    builder = _BUILDERS[task]
    spec = builder(rng, tokenizer, num_tokens, depth, root)
    return _fit(spec, task, tokenizer, num_tokens, depth, seed)


# --------------------------------------------------------------------------------------------------- vocabularies
# Small hand-written lists: keys are "adjective-noun" pairs.
_ADJECTIVES = (
    "amber", "bashful", "brittle", "calm", "clumsy", "crimson", "curious", "dapper", "dusty", "eager", "elastic",
    "fancy", "ferocious", "fluffy", "frosty", "gentle", "gigantic", "glossy", "grumpy", "hasty", "hollow", "humble",
    "icy", "jolly", "lanky", "lively", "lucky", "mellow", "misty", "nimble", "noisy", "olive", "orderly", "plucky",
    "polite", "quiet", "rapid", "rusty", "salty", "scarlet", "shiny", "sleepy", "soggy", "spicy", "stormy", "sturdy",
    "tidy", "velvet", "wobbly", "zesty",
)
_NOUNS = (
    "anchor", "apricot", "badger", "banjo", "biscuit", "blanket", "bucket", "cactus", "canoe", "carrot", "comet",
    "cricket", "dolphin", "drum", "falcon", "fern", "goblet", "harbor", "hedgehog", "kettle", "lantern", "lobster",
    "magnet", "meadow", "mitten", "noodle", "otter", "paddle", "parrot", "pebble", "pepper", "piano", "pillow",
    "puffin", "quilt", "ravioli", "saddle", "sardine", "teapot", "thimble", "tortoise", "trumpet", "tulip", "turnip",
    "umbrella", "violin", "walnut", "whistle", "windmill", "yak",
)
# Book task: invented surnames (none occurs in the six novels; checked at use), possessions and containers.
_SURNAMES = (
    "Ashcombe", "Blakiston", "Brackley", "Calloway", "Dunstable", "Ellerby", "Fairbrook", "Fenwick", "Garside",
    "Hallamore", "Haverleigh", "Kingscote", "Lockhart", "Marlowe", "Netherby", "Pendarvis", "Ravenhill", "Sedgwick",
    "Thornycroft", "Trevanion", "Waverton", "Wexcombe", "Whitlock", "Yarborough",
)
_POSSESSIONS = (
    "silver snuff-box", "garnet brooch", "pearl necklace", "miniature portrait", "gold locket", "ivory fan",
    "tortoiseshell comb", "coral bracelet", "enamelled watch", "bundle of old letters", "lace veil",
    "amethyst ring", "topaz cross", "seal ring", "pair of diamond ear-rings", "book of receipts",
)
_CONTAINERS = (
    "cedar chest", "walnut writing-box", "japanned tea-caddy", "rosewood work-box", "leather trunk",
    "mahogany cabinet", "tin box", "satinwood casket", "painted hat-box", "brass-bound chest", "oak coffer",
    "lacquered cabinet",
)
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# ------------------------------------------------------------------------------------------------------ templates
_NIAH_INSTRUCTION = ("Somewhere in the long text below, some special magic numbers are hidden. Read it carefully and "
                     "keep the numbers in mind: afterwards you will be asked about them.\n\n")
_NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_NIAH_Q_ONE = "\n\nWhat is the special magic number for {key} mentioned in the text above?"
_NIAH_P_ONE = " Answer: The special magic number for {key} mentioned in the text is"
_NIAH_Q_ALL = "\n\nWhat are all the special magic numbers for {key} mentioned in the text above?"
_NIAH_P_ALL = " Answer: The special magic numbers for {key} mentioned in the text are"
_NIAH_Q_TWO = "\n\nWhat are the special magic numbers for {key1} and for {key2} mentioned in the text above?"
_NIAH_P_TWO = " Answer: The special magic numbers for {key1} and {key2} mentioned in the text are"

_VT_INSTRUCTION = ("The long text below contains a few variable assignments scattered among other sentences. Keep "
                   "track of every assignment: afterwards you will be asked which variables hold a given value.\n\n")
_VT_FIRST = "VAR {name} = {value}."
_VT_HOP = "VAR {name} = VAR {prev}."
_VT_QUESTION = ("\n\nWhich variables in the text above end up with the value {value}, either directly or through "
                "other variables? List all of them.")
_VT_PREFIX = " Answer: Following the assignments in the text, the {n} variables that hold the value {value} are:"

_QA_INSTRUCTION = ("Below are a number of documents. Answer the question that follows them using only the "
                   "information in the documents, and reply with the answer alone.\n\n")
_QA_QUESTION = ("\n\nAnswer the question using only the documents above. Give just the answer, with no other "
                "words.\n\nQuestion: {question}")
_QA_PREFIX = "\nAnswer:"
_QA_DOC = "Document {i}:\n{text}"
_QA_SEP = "\n\n"

_BOOK_INSTRUCTION = ("Below is a long passage from a novel. Read it carefully: afterwards you will be asked about a "
                     "detail in it.\n\n")
_BOOK_FACT = ("It was well known in the family that Mrs. {surname} kept her {item} in a {container} marked with "
              "the number {code}, and that no one else was ever allowed to open it.")
_BOOK_QUESTION = ("\n\nIn the passage above, what number was marked on the {container} in which Mrs. {surname} kept "
                  "her {item}?")
_BOOK_PREFIX = " Answer: The {container} in which Mrs. {surname} kept her {item} was marked with the number"


def _check_task(task: str) -> None:
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(ALL_TASKS)}")


# --------------------------------------------------------------------------------------------------------- builders
@dataclass
class _Spec:
    """A task instance before its haystack is sized: fixed texts plus ``build(budget) -> context``."""

    instruction: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    fixed_tokens: int  # tokens of instruction + question + prefix + needles + special tokens
    build: Callable[[int], str]
    query: str | None = None  # the bare question for a retriever (default: ``question`` stripped)


def _fit(spec: _Spec, task: str, tokenizer: Any, target: int, depth: float, seed: int) -> TaskSample:
    """Build the context with a haystack budget that puts the prompt within the accepted length window."""
    lo, hi = math.ceil(target * (1 - _LOW)), target + _HIGH
    budget = target - spec.fixed_tokens
    if budget < _MIN_HAYSTACK:
        raise ValueError(f"num_tokens={target} is too small for task {task!r}: its instruction, question and "
                         f"needles alone take {spec.fixed_tokens} tokens")
    best = None
    for _ in range(4):
        context = spec.build(budget)
        sample = TaskSample(task=task, instruction=spec.instruction, context=context, question=spec.question,
                            answer_prefix=spec.answer_prefix, answers=spec.answers, metric=_METRIC.get(task, "all"),
                            depth=depth, seed=seed, num_tokens=0,
                            query=spec.query if spec.query is not None else spec.question.strip())
        n = len(tokenizer(sample.prompt)["input_ids"])
        sample = dataclasses.replace(sample, num_tokens=n)
        if lo <= n <= hi:
            return sample
        if best is None or abs(n - target) < abs(best.num_tokens - target):
            best = sample
        budget += target - n - (_HIGH // 4 if n > hi else 0)
        if budget < _MIN_HAYSTACK:
            break
    if best is not None and math.ceil(target * 0.95) <= best.num_tokens <= target + 64:
        return best
    raise RuntimeError(f"could not fit task {task!r} to {target} tokens (closest: {best and best.num_tokens})")


def _fresh_number(rng: random.Random, digits: int, taken: set[str], corpus: str) -> str:
    while True:
        value = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        if value not in taken and value not in corpus:
            taken.add(value)
            return value


def _essay_source(rng: random.Random, root: str) -> str:
    """The essays joined, starting at a seeded essay (the rest follow in file order, wrapping around)."""
    essays = load_essays(root)
    start = rng.randrange(len(essays))
    return "\n\n".join(essays[start:] + essays[:start])


def _essay_haystack(tokenizer: Any, source: str, budget: int, total: int) -> str:
    """About ``budget`` tokens of ``source`` (repeated when the budget is longer than all the essays)."""
    text = source
    tok = tokenize_prefix(tokenizer, text, budget + 64)
    while len(tok) < budget + 64:
        text = text + "\n\n" + source
        tok = tokenize_prefix(tokenizer, text, budget + 64)
    return cut_at_sentence(tok, budget, total)


def _needle_tokens(tokenizer: Any, needles: list[str], sep: str = " ") -> int:
    return sum(count_tokens(tokenizer, sep + n) for n in needles)


def _build_niah(task: str) -> Callable[..., _Spec]:
    def build(rng: random.Random, tokenizer: Any, target: int, depth: float, root: Path) -> _Spec:
        root_s = str(root)
        corpus = essays_lower(root_s)
        pairs = rng.sample([(a, n) for a in _ADJECTIVES for n in _NOUNS], _NUM_NEEDLES)
        keys = [f"{a}-{n}" for a, n in pairs]
        taken: set[str] = set()
        if task == "niah_single":
            keys = keys[:1]
        elif task in _SAME_KEY_NEEDLES:
            keys = [keys[0]] * _SAME_KEY_NEEDLES[task]
        values = [_fresh_number(rng, 7, taken, corpus) for _ in keys]
        depths = [depth] + [rng.random() for _ in keys[1:]]
        needles = [_NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        if task in ("niah_single", "niah_multikey"):
            question, prefix = _NIAH_Q_ONE.format(key=keys[0]), _NIAH_P_ONE.format(key=keys[0])
            answers = (values[0],)
        elif task in _SAME_KEY_NEEDLES:
            question, prefix = _NIAH_Q_ALL.format(key=keys[0]), _NIAH_P_ALL.format(key=keys[0])
            answers = tuple(values)
        else:  # niah_multiquery: the first needle's key and one other
            other = rng.randrange(1, len(keys))
            question = _NIAH_Q_TWO.format(key1=keys[0], key2=keys[other])
            prefix = _NIAH_P_TWO.format(key1=keys[0], key2=keys[other])
            answers = (values[0], values[other])
        return _essay_spec(rng, tokenizer, root_s, target, _NIAH_INSTRUCTION, question, prefix, answers,
                           list(zip(depths, needles)))

    return build


def _build_vt(rng: random.Random, tokenizer: Any, target: int, depth: float, root: Path) -> _Spec:
    root_s = str(root)
    corpus = essays_lower(root_s)
    names: list[str] = []
    while len(names) < _VT_HOPS + 1:
        name = "".join(rng.choice(_LETTERS) for _ in range(5))
        if name not in names and name.lower() not in corpus:
            names.append(name)
    value = _fresh_number(rng, 5, set(), corpus)
    statements = [_VT_FIRST.format(name=names[0], value=value)]
    statements += [_VT_HOP.format(name=names[i], prev=names[i - 1]) for i in range(1, len(names))]
    # The first assignment at `depth`; the hops at seeded depths, in chain order among themselves.
    depths = [depth] + sorted(rng.random() for _ in range(_VT_HOPS))
    question = _VT_QUESTION.format(value=value)
    prefix = _VT_PREFIX.format(n=len(names), value=value)
    return _essay_spec(rng, tokenizer, root_s, target, _VT_INSTRUCTION, question, prefix, tuple(names),
                       list(zip(depths, statements)))


def _essay_spec(rng: random.Random, tokenizer: Any, root_s: str, target: int, instruction: str, question: str,
                prefix: str, answers: tuple[str, ...], placed: list[tuple[float, str]]) -> _Spec:
    """A task whose context is the essays with ``placed`` ``(depth, sentence)`` needles planted in them."""
    source = _essay_source(rng, root_s)
    fixed = (count_tokens(tokenizer, instruction + question + prefix) + num_special_tokens(tokenizer)
             + _needle_tokens(tokenizer, [sentence for _, sentence in placed]))

    def context(budget: int) -> str:
        body = _essay_haystack(tokenizer, source, budget, target)
        return plant(body, placed)[0]

    return _Spec(instruction, question, prefix, answers, fixed, context)


def _build_qa(rng: random.Random, tokenizer: Any, target: int, depth: float, root: Path) -> _Spec:
    root_s = str(root)
    squad = load_squad(root_s)
    lengths = squad_lengths(tokenizer, root_s)
    header = count_tokens(tokenizer, _QA_DOC.format(i=100, text="") + _QA_SEP)  # per-document overhead (about)
    fixed_text = count_tokens(tokenizer, _QA_INSTRUCTION + _QA_PREFIX) + num_special_tokens(tokenizer)
    room = target - fixed_text - 64
    # Draw questions until the gold paragraph takes at most half of the room (at long lengths: the first draw).
    for _ in range(1000):
        p_gold, q, answers = squad.questions[rng.randrange(len(squad.questions))]
        if lengths[p_gold] + header <= room // 2:
            break
    else:
        raise ValueError(f"num_tokens={target} is too small for task 'qa_squad': no gold paragraph fits")
    question = _QA_QUESTION.format(question=q)
    gold_article = squad.article_of[p_gold]
    order = [p for p in range(len(squad.paragraphs)) if squad.article_of[p] != gold_article]
    rng.shuffle(order)
    fixed = count_tokens(tokenizer, _QA_INSTRUCTION + question + _QA_PREFIX) + num_special_tokens(tokenizer) \
        + lengths[p_gold] + header

    def context(budget: int) -> str:
        # Whole distractor paragraphs in seeded order while they fit, then the next one cut at a sentence end to
        # fill what is left (paragraphs are ~150 tokens: too coarse to hit short targets otherwise).
        chosen, left = [], budget
        for p in order:
            cost = lengths[p] + header
            if cost <= left:
                chosen.append(squad.paragraphs[p])
                left -= cost
                continue
            if left - header >= 24:
                part = cut_at_sentence(Tokenized(tokenizer, squad.paragraphs[p]), left - header, target)
                if part:
                    chosen.append(part)
            break
        k = round(depth * len(chosen))
        docs = chosen[:k] + [squad.paragraphs[p_gold]] + chosen[k:]
        return _QA_SEP.join(_QA_DOC.format(i=i + 1, text=text) for i, text in enumerate(docs))

    return _Spec(_QA_INSTRUCTION, question, _QA_PREFIX, answers, fixed, context, query=q)


def _build_book(rng: random.Random, tokenizer: Any, target: int, depth: float, root: Path) -> _Spec:
    root_s = str(root)
    books = load_books(root_s)
    corpus = books_lower(root_s)
    surname = rng.choice([s for s in _SURNAMES if s.lower() not in corpus])
    item, container = rng.choice(_POSSESSIONS), rng.choice(_CONTAINERS)
    code = _fresh_number(rng, 7, set(), corpus)
    fact = _BOOK_FACT.format(surname=surname, item=item, container=container, code=code)
    question = _BOOK_QUESTION.format(surname=surname, item=item, container=container)
    prefix = _BOOK_PREFIX.format(surname=surname, item=item, container=container)
    b = rng.randrange(len(books))
    chapter_draw = rng.random()
    fixed = (count_tokens(tokenizer, _BOOK_INSTRUCTION + question + prefix) + num_special_tokens(tokenizer)
             + count_tokens(tokenizer, "\n\n" + fact))

    def source_for(budget: int) -> str:
        # Start at a seeded chapter of the chosen novel that leaves enough of it for the budget; when the budget is
        # longer than what is left of the novel, start at its beginning and go on into the next novels (cyclically).
        book = books[b]
        probe = book[:20000]
        need_chars = budget * len(probe) / max(count_tokens(tokenizer, probe), 1) * 1.1 + 2000
        starts = [m.start() for m in CHAPTER.finditer(book)]
        fits = [s for s in starts if len(book) - s >= need_chars]
        start = fits[int(chapter_draw * len(fits))] if fits else 0
        return "\n\n\n".join([book[start:]] + [books[(b + i) % len(books)] for i in range(1, 2 * len(books))])

    def context(budget: int) -> str:
        tok = tokenize_prefix(tokenizer, source_for(budget), budget + 64)
        body = cut_at_sentence(tok, budget, target)
        return plant(body, [(depth, fact)], sep="\n\n", paragraphs=True)[0]

    return _Spec(_BOOK_INSTRUCTION, question, prefix, (code,), fixed, context)


_BUILDERS: dict[str, Callable[..., _Spec]] = {
    "niah_single": _build_niah("niah_single"),
    "niah_multikey": _build_niah("niah_multikey"),
    "niah_multivalue": _build_niah("niah_multivalue"),
    "niah_longvalue": _build_niah("niah_longvalue"),
    "niah_longvalue48": _build_niah("niah_longvalue48"),
    "niah_multiquery": _build_niah("niah_multiquery"),
    "vt": _build_vt,
    "qa_squad": _build_qa,
    "book_austen": _build_book,
}
