"""Task registry over reasoning-gym, the held-out suite's seed fence, answer extraction and scoring."""

from __future__ import annotations

import dataclasses
import json

import pytest

import open_nemotron.data.tasks as tasks_module
from open_nemotron.data.filters import HeldoutIndex, heldout_questions
from open_nemotron.data.tasks import (
    ANSWER_INSTRUCTION,
    DIFFICULTIES,
    HELDOUT_DIFFICULTY,
    HELDOUT_SEED_START,
    HELDOUT_TASKS,
    MATH_SCORER,
    TASKS,
    VALIDATION_EXCLUDES_HELDOUT,
    VALIDATION_SEED_START,
    HeldoutSeedError,
    TaskError,
    TaskItem,
    extract_final_answer,
    heldout_suite,
    load_math_jsonl,
    make_items,
    score_answer,
    validation_suite,
)


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_and_difficulty_makes_items(task):
    for difficulty in DIFFICULTIES:
        items = make_items(task, 3, seed=11, difficulty=difficulty)
        assert [i.seed for i in items] == [11, 12, 13]
        for item in items:
            assert item.task == task and item.split == "train" and item.difficulty == difficulty
            assert item.question.endswith(ANSWER_INSTRUCTION) and item.answer
            assert json.loads(json.dumps(item.entry)) == item.entry  # JSON-able, as stored
            assert score_answer(item, f"The answer is \\boxed{{{item.answer}}}.") == 1.0


def test_items_are_deterministic_per_seed():
    a = make_items("chain_sum", 5, seed=7, difficulty="medium")
    assert a == make_items("chain_sum", 5, seed=7, difficulty="medium")
    # Each item comes from its own seed, so a shifted range shares the overlapping items exactly.
    assert a[1:] == make_items("chain_sum", 4, seed=8, difficulty="medium")
    assert a != make_items("chain_sum", 5, seed=7, difficulty="hard")


def test_heldout_seeds_are_refused_for_training():
    with pytest.raises(HeldoutSeedError):
        make_items("gcd", 1, seed=HELDOUT_SEED_START)
    with pytest.raises(HeldoutSeedError):
        make_items("gcd", 1, seed=VALIDATION_SEED_START)
    with pytest.raises(HeldoutSeedError, match="below 900000000"):
        make_items("gcd", 10, seed=VALIDATION_SEED_START - 5)  # the range would reach into the reserved seeds
    make_items("gcd", 5, seed=VALIDATION_SEED_START - 5)  # the last training seeds are fine
    # Validation seeds sit between the two: neither below them nor into the held-out range.
    with pytest.raises(HeldoutSeedError, match="validation"):
        make_items("gcd", 1, split="validation", seed=VALIDATION_SEED_START - 1)
    with pytest.raises(HeldoutSeedError, match="validation"):
        make_items("gcd", 10, split="validation", seed=HELDOUT_SEED_START - 5)
    assert make_items("gcd", 5, split="validation", seed=HELDOUT_SEED_START - 5)[-1].split == "validation"
    with pytest.raises(TaskError):
        make_items("gcd", 1, seed=-HELDOUT_SEED_START)  # Python seeds from abs(seed): a back door otherwise
    with pytest.raises(HeldoutSeedError):
        make_items("gcd", 1, split="heldout", seed=0)
    with pytest.raises(TaskError, match="expected one of"):
        make_items("no_such_task", 1)
    with pytest.raises(TaskError, match="difficulty"):
        make_items("gcd", 1, difficulty="extreme")


def test_validation_suite_is_fixed_and_shares_no_question_with_the_heldout_suite():
    suite = validation_suite(30)
    assert suite == validation_suite(30)
    assert validation_suite(4) == [i for t in HELDOUT_TASKS for i in [j for j in suite if j.task == t][:4]]
    assert [i.task for i in suite] == [t for t in HELDOUT_TASKS for _ in range(30)]
    assert all(i.split == "validation" and VALIDATION_SEED_START <= i.seed < HELDOUT_SEED_START for i in suite)
    assert all(i.difficulty == HELDOUT_DIFFICULTY for i in suite)
    heldout_items = heldout_suite(VALIDATION_EXCLUDES_HELDOUT)
    heldout = {(i.task, i.question) for i in heldout_items}
    assert not heldout & {(i.task, i.question) for i in suite}
    # The training data's decontamination rule finds no overlap either.
    index = HeldoutIndex.build(heldout_questions(heldout_items))
    assert all(index.contaminated_by(i.question) is None for i in suite)
    # At easy difficulty some seeds do draw a held-out question: they were skipped, not kept.
    drawn = [i for t in HELDOUT_TASKS for i in make_items(t, 30, split="validation", seed=VALIDATION_SEED_START)]
    assert heldout & {(i.task, i.question) for i in drawn}


def test_heldout_suite_is_fixed_and_disjoint_from_training():
    suite = heldout_suite(20)
    assert suite == heldout_suite(20)
    assert heldout_suite(5) == [i for i in suite if i.seed < HELDOUT_SEED_START + 5]
    assert [i.task for i in suite] == [t for t in HELDOUT_TASKS for _ in range(20)]
    assert all(i.split == "heldout" and i.seed >= HELDOUT_SEED_START for i in suite)
    assert all(i.difficulty == HELDOUT_DIFFICULTY for i in suite)
    # Seeds keep the suites apart where the question space is large. At easy difficulty it is small enough that a
    # training seed can draw a held-out question by chance: the decontamination filter removes those
    # (test_data_filters.py::test_easy_training_items_that_repeat_a_heldout_question_are_removed).
    medium = heldout_suite_at("medium", 20)
    for task in HELDOUT_TASKS:
        train = {i.question for i in make_items(task, 200, seed=0, difficulty="medium")}
        held = {i.question for i in medium if i.task == task}
        assert not train & held, task
    assert len(heldout_suite()) == len(HELDOUT_TASKS) * 50


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("The answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1}, then on reflection \\boxed{2}", "2"),
        ("$\\boxed{-3}$", "-3"),
        ("So the answer is 17.", "17"),
        ("The answer is 42 legs.", "42"),
        ("The answer is: -8.", "-8"),
        ("the answer is 3/4", "3/4"),
        ("Answer: 1a3", "1a3"),
        ("Answer: **12**", "12"),
        ("We get 1,234 in total", "1234"),
        ("<think>Maybe \\boxed{5}? No.</think>\n\nThe answer is 7.", "7"),
        ("<think>\n12 + 1 = 13\n</think>\n\nIt is 13", "13"),
        ("reasoning already in the prompt</think>\n\n\\boxed{9}", "9"),
        ("<think>never closed, \\boxed{3}", None),
        ("<think>done</think>", None),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


def test_score_is_exactly_one_or_zero():
    item = make_items("gsm_symbolic", 1, seed=3)[0]
    assert score_answer(item, f"\\boxed{{{item.answer}}}") == 1.0
    # reasoning-gym gives 0.01 for a wrong gsm_symbolic answer; we count it as wrong.
    assert score_answer(item, "\\boxed{123456789}") == 0.0
    chain = make_items("chain_sum", 1, seed=3)[0]
    assert score_answer(chain, f"<think>the sum</think>\n\n\\boxed{{{chain.answer}}}") == 1.0
    assert score_answer(chain, f"<think>\\boxed{{{chain.answer}}}") == 0.0  # unfinished thinking has no answer
    assert score_answer(chain, "I don't know") == 0.0


def test_math_jsonl_scored_with_math_verify(tmp_path):
    rows = [
        {"question": "What is one divided by two?", "answer": "\\frac{1}{2}"},
        {
            "problem": "What is three quarters?",
            "solution": "Three of four parts: \\boxed{\\frac{3}{4}}.",
            "level": "Level 1",
        },
        {"question": "Natalia sold 48 clips ...", "answer": "She sold 48/2 = 24 in May.\n48 + 24 = 72\n#### 72"},
        {"problem": "Half of one?", "answer": "0.5"},
    ]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_math_jsonl(path)
    assert [i.answer for i in items] == ["\\frac{1}{2}", "\\frac{3}{4}", "72", "0.5"]
    assert [i.difficulty for i in items] == ["unrated", "Level 1", "unrated", "unrated"]
    assert all(i.task == "math" and i.question.endswith(ANSWER_INSTRUCTION) for i in items)
    frac, quarter, gsm, half = items
    assert score_answer(frac, "The answer is \\boxed{0.5}.") == 1.0  # \frac vs decimal
    assert score_answer(frac, "\\boxed{0.25}") == 0.0
    assert score_answer(quarter, "<think>3/4</think>\n\nThe answer is 0.75") == 1.0
    assert score_answer(gsm, "\\boxed{72}") == 1.0
    assert score_answer(gsm, "\\boxed{71}") == 0.0
    assert score_answer(half, "\\boxed{\\frac{1}{2}}") == 1.0
    assert score_answer(half, "no idea") == 0.0
    heldout = load_math_jsonl(path, split="heldout")
    assert {i.split for i in heldout} == {"heldout"}


def test_math_jsonl_rejects_bad_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "Q?", "answer": "1"}) + "\n" + json.dumps({"question": "Q2?"}) + "\n")
    with pytest.raises(TaskError, match="bad.jsonl:2"):
        load_math_jsonl(path)
    with pytest.raises(TaskError, match="no such file"):
        load_math_jsonl(tmp_path / "missing.jsonl")


def heldout_suite_at(difficulty: str, n: int):
    return [
        item
        for task in HELDOUT_TASKS
        for item in make_items(task, n, split="heldout", seed=HELDOUT_SEED_START, difficulty=difficulty)
    ]


MALFORMED_ANSWERS = [
    "\\boxed{}",
    "\\boxed{1/0}",
    "\\boxed{abc}",
    "\\boxed{nan}",
    "\\boxed{inf}",
    "\\boxed{-}",
    "\\boxed{1e999999999}",
    "\\boxed{)(}",
    "\\boxed{\\frac{1}{0}}",
    "\\boxed{\\frac{}{}}",
    "\\boxed{" + "(" * 200 + "1" + ")" * 200 + "}",
    "\\boxed{\x00\ufffd}",
]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_malformed_answers_score_zero(task):
    item = make_items(task, 1, seed=5)[0]
    for response in MALFORMED_ANSWERS:
        assert score_answer(item, response) == 0.0, response


def test_malformed_answers_score_zero_with_math_verify():
    item = TaskItem("math", "q", "7", {"question": "q", "answer": "7", "scorer": MATH_SCORER}, "train", 0, "unrated")
    assert score_answer(item, "\\boxed{7}") == 1.0
    for response in MALFORMED_ANSWERS:
        assert score_answer(item, response) == 0.0, response


def _raising(error: BaseException):
    def scorer(*args, **kwargs):
        raise error

    return scorer


@pytest.mark.parametrize("error", [ValueError("not a number"), ArithmeticError("overflow")])
def test_a_scorer_refusing_the_answer_is_a_wrong_answer(monkeypatch, error):
    item = make_items("chain_sum", 1, seed=3)[0]
    monkeypatch.setattr(tasks_module, "_rg_scorer", lambda name: _raising(error))
    assert score_answer(item, "\\boxed{12}") == 0.0


@pytest.mark.parametrize("error", [TypeError("bug"), KeyError("answer"), AttributeError("bug"), RuntimeError("bug")])
def test_a_scorer_bug_propagates(monkeypatch, error):
    item = make_items("chain_sum", 1, seed=3)[0]
    monkeypatch.setattr(tasks_module, "_rg_scorer", lambda name: _raising(error))
    with pytest.raises(type(error)):
        score_answer(item, "\\boxed{12}")


def test_math_verify_timeout_is_a_wrong_answer_and_its_bugs_propagate(monkeypatch):
    from math_verify.errors import TimeoutException

    item = TaskItem("math", "q", "7", {"question": "q", "answer": "7", "scorer": MATH_SCORER}, "train", 0, "unrated")
    monkeypatch.setattr(tasks_module, "math_verify_equal", _raising(TimeoutException("slow")))
    assert score_answer(item, "\\boxed{7}") == 0.0
    # math-verify's own refusal to run off the main thread with a timeout is our bug, not a wrong answer.
    monkeypatch.setattr(tasks_module, "math_verify_equal", _raising(ValueError("signal only works in main thread")))
    with pytest.raises(ValueError, match="main thread"):
        score_answer(item, "\\boxed{7}")
    monkeypatch.setattr(tasks_module, "math_verify_equal", _raising(TypeError("bug")))
    with pytest.raises(TypeError):
        score_answer(item, "\\boxed{7}")


def test_a_bug_on_our_side_propagates():
    item = make_items("chain_sum", 1, seed=3)[0]
    broken = dataclasses.replace(item, entry={"question": item.question})  # no "answer": the scorer's KeyError
    with pytest.raises(KeyError):
        score_answer(broken, f"\\boxed{{{item.answer}}}")


def test_eval_suites_by_name_are_balanced_across_tasks():
    from open_nemotron.errors import OpenNemotronError
    from open_nemotron.evaluate.reasoning_eval import load_suite

    for name, split in (("heldout", "heldout"), ("validation", "validation")):
        items = load_suite(name, limit=8)
        # Two rounds over the six tasks, cut at 8: every task once, then the first two again.
        assert [i.task for i in items] == [*HELDOUT_TASKS, *HELDOUT_TASKS[:2]]
        assert all(i.split == split for i in items)
    assert load_suite("validation", limit=8)[0] == validation_suite(1)[0]
    with pytest.raises(OpenNemotronError, match="'heldout', 'validation'"):
        load_suite("valid")
