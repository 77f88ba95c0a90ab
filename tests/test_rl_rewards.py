"""RL rewards (TRL reward-function form), IFEval checks against lm-eval's own scoring, synthetic IF prompts."""

from __future__ import annotations

import json

import pytest

from open_nemotron.data.tasks import make_items
from open_nemotron.rewards import functions
from open_nemotron.rewards.functions import (
    JudgeReward,
    RewardError,
    completion_text,
    parse_reward_weights,
    reward_functions,
)
from open_nemotron.rewards.instructions import (
    IFExample,
    InstructionError,
    accuracies,
    answer_text,
    check_response,
    instruction_ids,
    load_suite,
    synthetic_prompts,
)


def _row(item, thinking: bool) -> dict:
    return {"task": item.task, "answer": item.answer, "entry": json.dumps(item.entry), "thinking": thinking}


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


def test_accuracy_and_format_rewards_read_the_columns_and_the_answer_after_think() -> None:
    (item,) = make_items("chain_sum", 1, seed=3)
    right, wrong = f"The answer is {item.answer}.", f"The answer is {int(item.answer) + 1}."
    completions = [
        [{"role": "assistant", "content": f"<think>adding up</think>{right}"}],  # conversational form
        f"<think>the answer is {item.answer}</think>{wrong}",  # right inside think, wrong after: wrong
        right,
        f"<think>x</think>{right}",
    ]
    rows = [_row(item, True), _row(item, True), _row(item, False), _row(item, False)]
    cols = _columns(rows)
    assert functions.accuracy([None] * 4, completions, **cols) == [1.0, 0.0, 1.0, 1.0]
    assert functions.format([None] * 4, completions, **cols) == [1.0, 1.0, 1.0, 0.0]
    none_row = {**rows[0], "task": ""}
    assert functions.accuracy([None], [right], **_columns([none_row])) == [None]
    with pytest.raises(RewardError, match="column 'answer'"):
        functions.accuracy([None], [right], task=["chain_sum"], entry=["{}"])


def test_parse_reward_weights() -> None:
    assert parse_reward_weights("accuracy=1, format=0.5,instructions") == {
        "accuracy": 1.0,
        "format": 0.5,
        "instructions": 1.0,
    }
    with pytest.raises(RewardError, match="--rewards 'accuracy=x': expected name=weight"):
        parse_reward_weights("accuracy=x", option="--rewards")
    with pytest.raises(RewardError, match="expected at least one reward"):
        parse_reward_weights(" , ")


def test_reward_functions_maps_names_and_weights_and_refuses_bad_ones() -> None:
    funcs, weights = reward_functions({"accuracy": 1.0, "format": 0.5, "instructions": 0})
    assert [f.__name__ for f in funcs] == ["accuracy", "format"] and weights == [1.0, 0.5]
    with pytest.raises(RewardError, match="expected one of"):
        reward_functions({"speed": 1.0})
    with pytest.raises(RewardError, match=">= 0"):
        reward_functions({"accuracy": -1})
    with pytest.raises(RewardError, match="judge endpoint"):
        reward_functions({"judge": 1.0})
    with pytest.raises(RewardError, match="every weight is 0"):
        reward_functions({"accuracy": 0})
    assert completion_text([{"role": "assistant", "content": "a"}, {"content": "b"}]) == "ab"


class _ScriptedClient:
    """An OpenAI-client stand-in: replies from a script, records the prompts, fails on request."""

    def __init__(self, replies: list[str | Exception]) -> None:
        self.replies, self.prompts = list(replies), []
        self.chat = self
        self.completions = self

    def create(self, *, model, messages, **kwargs):
        self.prompts.append(messages[0]["content"])
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply

        class _Message:
            content = reply

        class _Choice:
            message = _Message()

        class _Reply:
            choices = [_Choice()]

        return _Reply()


def test_judge_reward_parses_yes_no_sends_only_the_answer_and_survives_errors() -> None:
    client = _ScriptedClient(["Yes.", "no", "maybe", ConnectionError("down")])
    judge = JudgeReward("http://unused", "judge-model", client=client)
    logged = {}
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    completions = ["<think>secret reasoning</think>Paris", "Lyon", "Nice", "Lille"]
    out = judge(prompts, completions, answer=["Paris"] * 4, log_metric=lambda k, v: logged.update({k: v}))
    assert out == [1.0, 0.0, None, None] and logged == {"judge_errors": 2.0}
    assert "question 0" in client.prompts[0] and "Paris" in client.prompts[0]
    assert "secret reasoning" not in client.prompts[0]
    with pytest.raises(RewardError, match="placeholder"):
        JudgeReward("http://unused", "m", prompt="no placeholders", client=client)


# --------------------------------------------------------------------------------------------- IFEval checks

# Hand-written passing and failing responses, one or more per instruction id (ids in IFEval's registry).
CASES: list[tuple[str, dict, str, str]] = [
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "THIS is VERY loud",
        "this is quiet",
    ),
    ("change_case:english_capital", {}, "ALL OF THIS IS SHOUTED IN ENGLISH", "Not all of this is shouted"),
    ("change_case:english_lowercase", {}, "everything here is in lowercase english", "Something Is Capitalised"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Say hi. Hi there!", "Hi there!"),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "Only one answer."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", "Dear you."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. See you.", "Hello, see you."),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Perhaps."),
    ("detectable_format:json_format", {}, '{"a": 1}', "a is 1"),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "SECTION", "num_sections": 2},
        "SECTION 1\nfoo\nSECTION 2\nbar",
        "foo bar",
    ),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and *b*", "*a* only"),
    ("detectable_format:title", {}, "<<A Title>>\nText.", "No title here."),
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "An apple and a pear.", "An apple only."),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "A dog barked.", "A cat meowed."),
    ("keywords:frequency", {"keyword": "sun", "frequency": 2, "relation": "at least"}, "sun, sun", "sun"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "zz top", "top"),
    (
        "language:response_language",
        {"language": "fr"},
        "Bonjour, je suis très heureux de vous voir aujourd'hui dans cette belle ville.",
        "Hello, I am very happy to see you today in this beautiful city.",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        "First part.\n\nThen the second.",
        "First part.\n\nAfter that.",
    ),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\nTwo.", "One paragraph."),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "less than"},
        "Dr. Smith arrived at 3 p.m. on Jan. 5.",
        "One. Two. Three.",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "less than"},
        "Just four words here",
        "a b c d e f",
    ),
    ("punctuation:no_comma", {}, "No commas at all.", "A comma, here."),
    ("startend:end_checker", {"end_phrase": "Any questions?"}, "That is all. Any questions?", "That is all."),
    ("startend:quotation", {}, '"Quoted entirely."', "Not quoted."),
]


def test_every_registry_instruction_has_a_hand_written_case() -> None:
    assert sorted({c[0] for c in CASES}) == instruction_ids()


@pytest.mark.parametrize(("instruction_id", "kwargs", "passing", "failing"), CASES, ids=[c[0] for c in CASES])
def test_each_instruction_check_on_hand_written_responses(instruction_id, kwargs, passing, failing) -> None:
    example = IFExample("Say hi.", [instruction_id], [kwargs])
    assert check_response(example, passing).strict == [True]
    assert check_response(example, failing).strict == [False]


def test_reasoning_on_checks_only_the_answer_after_think() -> None:
    example = IFExample("p", ["punctuation:no_comma"], [{}])
    assert check_response(example, "<think>a, b, c</think>No commas.", thinking=True).strict == [True]
    assert check_response(example, "<think>never closed, here", thinking=True).strict == [False]
    assert answer_text("<think>r</think>  A", True) == "A" and answer_text("x, y", False) == "x, y"


def test_our_accuracies_equal_lm_evals_own_process_results_and_aggregation() -> None:
    """Same responses scored by lm-eval's IFEval task code (process_results per doc, mean for prompt level,
    agg_inst_level_acc for instruction level) and by `accuracies`: equal, on a mix that separates strict from loose
    (markdown asterisks and a first line the loose variants strip)."""
    from lm_eval.tasks.ifeval import utils

    examples = [IFExample("Say hi.", [c[0]], [c[1]], key=i) for i, c in enumerate(CASES)]
    examples += [
        IFExample("two", ["punctuation:no_comma", "startend:end_checker"], [{}, {"end_phrase": "Bye."}], key=100),
        IFExample("quote", ["startend:quotation"], [{}], key=101),
        IFExample("title", ["detectable_format:title", "keywords:existence"], [{}, {"keywords": ["x"]}], key=102),
    ]
    responses = [c[2] if i % 2 else c[3] for i, c in enumerate(CASES)]
    responses += ["Sure here it is\nNo commas here. Bye.", 'Here:\n"quoted"', "**<<T>>** x"]
    ours = accuracies([check_response(ex, r) for ex, r in zip(examples, responses, strict=True)])
    docs = [
        {"key": ex.key, "instruction_id_list": ex.instruction_id_list, "prompt": ex.prompt, "kwargs": ex.kwargs}
        for ex in examples
    ]
    per_doc = [utils.process_results(doc, [r]) for doc, r in zip(docs, responses, strict=True)]
    reference = {
        "prompt_level_strict_acc": sum(d["prompt_level_strict_acc"] for d in per_doc) / len(per_doc),
        "inst_level_strict_acc": utils.agg_inst_level_acc([d["inst_level_strict_acc"] for d in per_doc]),
        "prompt_level_loose_acc": sum(d["prompt_level_loose_acc"] for d in per_doc) / len(per_doc),
        "inst_level_loose_acc": utils.agg_inst_level_acc([d["inst_level_loose_acc"] for d in per_doc]),
    }
    assert ours == reference
    assert ours["prompt_level_loose_acc"] > ours["prompt_level_strict_acc"]  # the mix does separate them


def test_instruction_reward_is_the_followed_share_and_none_without_instructions() -> None:
    row = {
        "if_prompt": "p",
        "instruction_id_list": ["punctuation:no_comma", "startend:end_checker"],
        "instruction_kwargs": json.dumps([{}, {"end_phrase": "Bye."}]),
        "thinking": False,
    }
    empty = {"if_prompt": "", "instruction_id_list": [], "instruction_kwargs": "[]", "thinking": False}
    cols = _columns([row, row, empty])
    assert functions.instructions([None] * 3, ["No commas. Bye.", "A, b. Bye.", "x"], **cols) == [1.0, 0.5, None]


def test_synthetic_prompts_are_reproducible_conflict_free_and_checkable() -> None:
    from lm_eval.tasks.ifeval import instructions_registry as registry

    first, again = synthetic_prompts(40, seed=5), synthetic_prompts(40, seed=5)
    assert [e.prompt for e in first] == [e.prompt for e in again]
    assert [e.prompt for e in first] != [e.prompt for e in synthetic_prompts(40, seed=6)]
    counts = [len(e.instruction_id_list) for e in first]
    assert min(counts) >= 1 and max(counts) <= 10 and len(set(counts)) > 3
    for ex in first:
        ids = ex.instruction_id_list
        assert len(set(ids)) == len(ids)
        assert not any(b in registry.INSTRUCTION_CONFLICTS.get(a, ()) for a in ids for b in ids if a != b)
        check_response(ex, "some response")  # every drawn kwargs set is accepted by its checker
    with pytest.raises(InstructionError, match="eval suite"):
        synthetic_prompts(1, exclude=["Please: Describe how to make a cup of tea. Then more."])


def test_load_suite_reads_ifeval_rows_and_names_bad_ones(tmp_path) -> None:
    good = tmp_path / "ifeval_mini.jsonl"
    rows = [{"key": 1, "prompt": "Hi", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}]
    good.write_text("\n".join(json.dumps(r) for r in rows))
    suite = load_suite(good)
    assert suite.name == "ifeval_mini" and suite.examples[0].instruction_id_list == ["punctuation:no_comma"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "instruction_id_list": ["no:such"], "kwargs": [{}]}))
    with pytest.raises(InstructionError, match="unknown"):
        load_suite(bad)
    bad.write_text(json.dumps({"prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}))
    with pytest.raises(InstructionError, match="one each"):
        load_suite(bad)


def test_the_shipped_heldout_if_suite_is_checkable_and_disjoint_from_the_synthetic_bank() -> None:
    """recipes/if-heldout.jsonl (40 hand-written IFEval-format prompts, each with its instructions' own
    descriptions): every row loads and is accepted by its checkers, and no synthetic base request appears in it,
    so `rl prompts --exclude-suite recipes/if-heldout.jsonl` accepts the default bank."""
    from pathlib import Path

    from open_nemotron.rewards.instructions import BASE_REQUESTS

    suite = load_suite(Path(__file__).parent.parent / "recipes" / "if-heldout.jsonl")
    assert len(suite.examples) == 40 and len({e.prompt for e in suite.examples}) == 40
    for example in suite.examples:
        check_response(example, "a response")
    assert not any(b in e.prompt for b in BASE_REQUESTS for e in suite.examples)
    assert synthetic_prompts(5, exclude=[e.prompt for e in suite.examples])
