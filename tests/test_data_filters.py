"""The SFT data filters: per-stage counts, near-duplicates, decontamination against the held-out suite, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers_for_tests import chatml_tokenizer

from open_nemotron.data.filters import (
    DataReport,
    FilterError,
    HeldoutIndex,
    check_format,
    core,
    decontaminate,
    drop_exact_duplicates,
    drop_near_duplicates,
    jaccard,
    limit_lengths,
    ngrams,
    run_filters,
    shared_template,
    tokens,
    verify_answers,
)
from open_nemotron.data.schema import Example, RowReport
from open_nemotron.data.tasks import HELDOUT_SEED_START, TaskItem, heldout_suite, make_items
from open_nemotron.model.chat_template import THINKING_OFF, THINKING_ON

INSTRUCTION = "\n\nPut your final answer within \\boxed{}."


def example(
    question: str,
    output: str,
    mode: str = "on",
    *,
    task: str | None = "math",
    answer: str | None = "7",
) -> Example:
    return Example(
        input=[{"role": "user", "content": question}],
        output=output,
        reasoning=mode,
        system_prompt=THINKING_ON if mode == "on" else THINKING_OFF,
        category="math",
        generator="test",
        task=task,
        answer=answer,
    )


def on(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


def sum_question(a: int, b: int) -> str:
    return f"State the final answer to the following arithmetic problem: {a} + {b} ={INSTRUCTION}"


def heldout_item(task: str, question: str, seed: int = 10**9) -> TaskItem:
    return TaskItem(task=task, question=question, answer="", entry={}, split="heldout", seed=seed, difficulty="medium")


def training_rows(questions: list[str], task: str = "chain_sum") -> list[Example]:
    return [example(q, on("r", "\\boxed{1}"), task=task, answer=None) for q in questions]


@pytest.fixture
def mixed_rows() -> list[Example]:
    return [
        example("What is 2 + 5?", on("2 plus 5 is 7.", "The answer is \\boxed{7}.")),  # kept
        example("What is 2 + 5?", "The answer is \\boxed{7}.", "off"),  # kept: same prompt, other mode
        example("What is 3 + 3?", on("3 plus 3 is 7.", "\\boxed{7}"), answer="6"),  # wrong answer
        example("Write a haiku about autumn.", "Leaves drift down slowly.", "off", task=None, answer=None),  # no gold
        example("What is 1 + 6?", on("1 + 6 = 7", "7"), "off"),  # think tags with reasoning off: format
        example("What is 4 + 4?", on("4 + 4 = 8. " * 2000, "\\boxed{8}"), answer="8"),  # too long for "on"
        example("  what IS 2 +5 ?", on("Add them.", "\\boxed{7}")),  # exact duplicate of the first, normalised
    ]


# ------------------------------------------------------------------------------------------------ stages


def test_each_stage_counts(mixed_rows: list[Example]) -> None:
    kept, report = run_filters(mixed_rows, heldout=[])
    counts = {s.name: (s.rows_in, s.rows_out, s.removed, s.passed_unchecked) for s in report.stages}
    assert counts == {
        "format": (7, 6, {"think_in_off": 1}, {}),
        "answer": (6, 5, {"wrong_answer": 1}, {"no_gold_answer": 1}),
        "length": (5, 4, {"too_long_on_chars": 1}, {}),
        "exact_dedup": (4, 3, {"duplicate": 1}, {}),
        "near_dedup": (3, 3, {}, {}),
        "decontamination": (3, 3, {}, {}),
    }
    assert [ex.input[0]["content"] for ex in kept] == [
        "What is 2 + 5?",
        "What is 2 + 5?",
        "Write a haiku about autumn.",
    ]
    assert (report.rows_in, report.rows_out) == (7, 3)
    assert report.by_mode_in == {"on": 4, "off": 3} and report.by_mode_out == {"on": 1, "off": 2}

    _, unverified = run_filters(mixed_rows, heldout=[], verify=False)
    assert unverified.stage("answer").passed_unchecked == {"verification_off": 6}
    assert unverified.stage("answer").rows_out == 6


def test_format_and_answer_stages_directly() -> None:
    rows = [
        example("q1", "no think block"),  # on without tags
        example("q2", "<think>a</think><think>b</think>c"),
        example("q3", on("r", "")),  # nothing after </think>
        example("q4", on("r", "\\boxed{7}")),
    ]
    kept, stage = check_format(rows)
    assert stage.removed == {"missing_think": 1, "bad_think": 1, "empty_answer": 1} and len(kept) == 1
    kept, stage = verify_answers([example("q", on("r", "\\boxed{1/2}"), answer="0.5"), example("q", "7", "off")])
    assert len(kept) == 2 and stage.removed == {}  # math-verify equivalence for rows outside the registry

    item = make_items("chain_sum", 1, seed=3)[0]
    rg_rows = [
        example(item.question, on("r", f"\\boxed{{{item.answer}}}"), task="chain_sum", answer=item.answer),
        example(item.question, f"\\boxed{{{int(item.answer) + 1}}}", "off", task="chain_sum", answer=item.answer),
    ]
    for ex in rg_rows:
        ex.metadata = {"entry": item.entry}
    kept, stage = verify_answers(rg_rows)
    assert len(kept) == 1 and stage.removed == {"wrong_answer": 1}


def test_length_limits_in_tokens_and_chars() -> None:
    rows = [example("q", on("x" * 40, "7")), example("q", "7" * 40, "off"), example("q", "7", "off")]
    # The test tokenizer is byte-level: one token per byte of "q\n" + output.
    kept, stage = limit_lengths(rows, {"off": 10}, tokenizer=chatml_tokenizer())
    assert len(kept) == 2 and stage.removed == {"too_long_off_tokens": 1}  # "on" has no limit here
    kept, stage = limit_lengths(rows, {"on": 20, "off": 100})
    assert len(kept) == 2 and stage.removed == {"too_long_on_chars": 1}
    with pytest.raises(FilterError, match="max_length"):
        limit_lengths(rows, {"on": 0})


def test_exact_duplicates_are_per_mode() -> None:
    rows = [
        example("What is 2+5?", "7", "off"),
        example("what is 2 + 5 ?", "seven", "off"),
        example("What is 2+5?", on("r", "7")),
    ]
    kept, stage = drop_exact_duplicates(rows)
    assert [ex.output for ex in kept] == ["7", on("r", "7")] and stage.removed == {"duplicate": 1}


# ------------------------------------------------------------------------------------------------ near duplicates

PARAGRAPH = (
    "Explain in plain words why the sky looks blue on a clear day and red at sunset, mentioning how sunlight is "
    "scattered by the molecules of the air, why shorter wavelengths scatter more than longer ones, how the path "
    "length of light through the atmosphere changes when the sun is low, and what role dust and water droplets "
    "play in the colours we see; keep the explanation short enough for a curious twelve year old to follow it."
)


def test_near_duplicates_in_free_text() -> None:
    variant = PARAGRAPH.replace("curious", "bright")  # one word of ~90 changed
    other = "Write a short poem about the sea at night, with a lighthouse, a storm and a sleeping town."
    rows = [
        example(PARAGRAPH, "a", "off"),
        example(variant, "b", "off"),
        example(other, "c", "off"),
        example(variant, on("r", "b")),
    ]  # the same prompt with reasoning on is not a duplicate of an off row
    kept, stage = drop_near_duplicates(rows, 0.9)
    assert [ex.output for ex in kept] == ["a", "c", on("r", "b")] and stage.removed == {"near_duplicate": 1}
    assert jaccard(ngrams(tokens(PARAGRAPH), 3), ngrams(tokens(variant), 3)) >= 0.9
    again, _ = drop_near_duplicates(rows, 0.9)
    assert again == kept  # deterministic
    with pytest.raises(FilterError, match="threshold"):
        drop_near_duplicates(rows, 1.5)


def test_near_duplicates_compare_cores_of_templated_prompts() -> None:
    # Ten chain_sum-style prompts: the shared template dominates whole-prompt similarity, the cores differ.
    questions = [sum_question(100 + 7 * i, 900 - 3 * i) for i in range(10)]
    whole_prompt = jaccard(ngrams(tokens(questions[0]), 3), ngrams(tokens(questions[1]), 3))
    assert whole_prompt > 0.6  # whole prompts this alike would be near-duplicates at 0.6
    kept, stage = drop_near_duplicates(training_rows(questions), 0.6)
    assert len(kept) == 10 and stage.removed == {}

    animals = ", ".join(
        f"{i + 2} {name}"
        for i, name in enumerate(["cows", "ducks", "spiders", "cats", "ants", "crabs", "dogs", "bees"])
    )
    template = "Your task is to count how many legs there are in total when given a list of animals. Now, how many legs are there in total if you have {}?"
    legs = [template.format(animals), template.format(animals.replace("9 bees", "10 bees"))]
    legs += [template.format(f"{i} cows, {i + 1} ducks") for i in range(1, 9)]
    kept, stage = drop_near_duplicates(training_rows(legs, task="leg_counting"), 0.8)
    assert len(kept) == 9 and stage.removed == {"near_duplicate": 1}


# ------------------------------------------------------------------------------------------------ decontamination


def test_templates_and_cores() -> None:
    qs = [tokens(sum_question(812, 880)), tokens(sum_question(5, 77)), tokens(sum_question(31, 2))]
    template = shared_template(qs)
    assert core(qs[0], template) == ["812", "+", "880"]
    assert shared_template(qs[:1]) == (0, 0)
    assert core(["a"], (1, 0)) == ["a"]  # never empty
    assert tokens("Calculate -5*6.") == ["calculate", "-", "5", "*", "6", "."]


def test_decontamination_rule_on_a_synthetic_suite() -> None:
    heldout = [
        heldout_item("sum", sum_question(a, b), 10**9 + i) for i, (a, b) in enumerate([(812, 880), (5, 77), (31, 2)])
    ]
    heldout += [heldout_item("prime", f"Is {n} prime? Answer yes or no.", 10**9 + n) for n in (7, 11)]
    rows = training_rows(
        [
            f"A friend sent me this: {sum_question(812, 880)} Please help.",  # pasted held-out question
            "Compute 812 + 880.",  # the held-out problem in other words: its whole core is there
            sum_question(812, 5),  # same task, first number in common: an ordinary training prompt
            sum_question(880, 812),  # same numbers, other problem
            sum_question(40, 41),
            "Is 7 prime? Answer yes or no.",  # short cores (one token) need the whole held-out question
            "Is 13 prime? Answer yes or no.",
            "What is 7 squared? Answer with a number.",
        ]
    )
    kept, stage = decontaminate(rows, heldout)
    assert [ex.input[0]["content"] for ex in kept] == [
        sum_question(812, 5),
        sum_question(880, 812),
        sum_question(40, 41),
        "Is 13 prime? Answer yes or no.",
        "What is 7 squared? Answer with a number.",
    ]
    assert stage.removed == {"overlaps_heldout:sum": 2, "overlaps_heldout:prime": 1}
    with pytest.raises(FilterError, match="overlap"):
        HeldoutIndex.build([("t", "q", "l")], min_overlap=0)


@pytest.fixture(scope="module")
def suite() -> list[TaskItem]:
    # Plus long word problems (not in the fixed suite, but a user's held-out set may have them).
    word_problems = make_items("gsm_symbolic", 5, split="heldout", seed=HELDOUT_SEED_START, difficulty="medium")
    return heldout_suite(n_per_task=10) + word_problems


def test_contaminated_prompt_is_removed_and_ordinary_prompts_survive(suite: list[TaskItem]) -> None:
    tasks = sorted({item.task for item in suite})
    contaminated, ordinary = [], []
    for task in tasks:
        h = [item for item in suite if item.task == task][3]
        contaminated.append(f"Here is a problem from last week's quiz.\n\n{h.question}\n\nShow your work, please.")
        ordinary += [item.question for item in make_items(task, 15, seed=500, difficulty="medium")]
    rows = training_rows(contaminated + ordinary, task=None)
    kept, stage = decontaminate(rows, suite)
    kept_prompts = {ex.input[0]["content"] for ex in kept}
    assert not kept_prompts & set(contaminated)  # every pasted held-out question is removed
    assert set(ordinary) <= kept_prompts  # every ordinary same-task training prompt survives
    assert sum(stage.removed.values()) == len(tasks)
    assert stage.removed == {f"overlaps_heldout:{task}": 1 for task in tasks}

    # A truncated paste of a long held-out word problem (its first three quarters, instruction cut off) is caught.
    word_problem = next(item for item in suite if item.task == "gsm_symbolic").question
    words = word_problem.split()
    partial = "Solve this: " + " ".join(words[: 3 * len(words) // 4])
    assert len(decontaminate(training_rows([partial]), suite)[0]) == 0

    # Through the whole pipeline, with the report counting it.
    item = make_items("chain_sum", 1, seed=11, difficulty="medium")[0]
    leaked = [h for h in suite if h.task == "chain_sum"][0]
    pipeline_rows = [
        example(item.question, on("r", f"\\boxed{{{item.answer}}}"), task="chain_sum", answer=item.answer),
        example(
            f"Quiz: {leaked.question}", on("r", f"\\boxed{{{leaked.answer}}}"), task="chain_sum", answer=leaked.answer
        ),
    ]
    for ex, src in zip(pipeline_rows, (item, leaked), strict=True):
        ex.metadata = {"entry": src.entry}
    kept, report = run_filters(pipeline_rows, heldout=suite)
    assert [ex.input[0]["content"] for ex in kept] == [item.question]
    assert report.stage("decontamination").removed == {"overlaps_heldout:chain_sum": 1}


# ------------------------------------------------------------------------------------------------ report


def test_report_renders_to_markdown_and_json(mixed_rows: list[Example], tmp_path: Path) -> None:
    load = RowReport(total=9, kept=7, dropped={"bad_json": 2})
    _, report = run_filters(mixed_rows, heldout=[], row_report=load)
    assert [s.name for s in report.stages][:2] == ["load", "format"]
    assert (report.rows_in, report.rows_out) == (9, 3)

    markdown = report.to_markdown()
    assert "3 of 9 rows kept (off: 2/3, on: 1/4)." in markdown
    assert "| load | 9 | 7 | 2 | bad_json 2 | - |" in markdown
    assert "| answer | 6 | 5 | 1 | wrong_answer 1 | no_gold_answer 1 |" in markdown
    assert "| decontamination | 3 | 3 | 0 | - | - |" in markdown

    data = json.loads(report.to_json())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert data["stages"][2] == {
        "name": "answer",
        "rows_in": 6,
        "rows_out": 5,
        "removed": {"wrong_answer": 1},
        "passed_unchecked": {"no_gold_answer": 1},
    }
    assert data["settings"]["length_unit"] == "chars" and data["settings"]["heldout_questions"] == 0

    json_path, md_path = report.write(tmp_path / "reports" / "data_report.json")
    assert md_path == tmp_path / "reports" / "data_report.md"
    assert json.loads(json_path.read_text()) == data and md_path.read_text() == markdown
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["data_report.json", "data_report.md"]
    assert DataReport().to_markdown().startswith("# Data report")


def test_easy_training_items_that_repeat_a_heldout_question_are_removed():
    """At easy difficulty the question space is small: training seeds can draw held-out questions; none survive."""
    suite = heldout_suite()
    held = {item.question for item in suite}
    train = [item for task in ("chain_sum", "basic_arithmetic") for item in make_items(task, 300, difficulty="easy")]
    repeats = [item for item in train if item.question in held]
    assert repeats  # the premise: collisions do occur at this level
    rows = [
        example(item.question, f"\\boxed{{{item.answer}}}", "off", task=item.task, answer=item.answer) for item in train
    ]
    kept, stage = decontaminate(rows, suite)
    assert not {row.input[0]["content"] for row in kept} & held
    assert sum(stage.removed.values()) >= len(repeats)
