"""The recipe runner (`open-nemotron run`) on a tiny random Llama parent: every stage in order, a rerun that does
nothing, a `kill -9` mid-run whose rerun completes with the same artifacts as an uninterrupted run, and recipe
validation with field-level errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from models_for_tests import save_tiny_llama, tiny_llama_config
from test_puzzle_pipeline import TEXT, tiny_config_dict

from open_nemotron.pipeline import RecipeError, distill_section, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(root: Path) -> Path:
    """A recipe over every stage at sizes that run in about a minute on 2 CPU cores."""
    parent = save_tiny_llama(root / "tiny-parent", tiny_llama_config(num_hidden_layers=3), seed=3)
    text = root / "calib.txt"
    text.write_text(TEXT)
    puzzle = tiny_config_dict(parent, text)
    del puzzle["parent"]  # the recipe's converted parent
    (root / "puzzle.yaml").write_text(yaml.safe_dump(puzzle))
    rl = {"num_generations": 2, "prompts_per_step": 2, "max_completion_length": 6, "max_steps": 2, "save_steps": 1}
    recipe = {
        "parent": str(parent),
        "device": "cpu",
        "non_portable_ffn_widths": True,  # the tiny parent's FFN is 70 wide
        "puzzle": "puzzle.yaml",
        "child": "max_params_30000",
        "distill": {
            "data": str(text),
            "seq_len": 16,
            "train_sequences": 8,
            "reporting_sequences": 2,
            "batch_size": 2,
            "train_tokens": 2 * 16 * 4,
            "learning_rate": 0.01,
            "report_every": 2,
            "save_steps": 1,
            "logging_steps": 1,
        },
        "fusion": None,
        "datagen": {"tasks": ["chain_sum"], "n_per_task": 4, "difficulties": ["easy"]},
        "sft": {"max_steps": 2, "batch_size": 2, "max_length": 1536, "save_steps": 1, "logging_steps": 1},
        "rl_prompts": {"tasks": ["chain_sum"], "per_task": 4},
        "pass_rate": {"samples": 2, "max_new_tokens": 6, "batch_size": 8},
        "grpo": {**rl, "learning_rate": 0.001},
        "if_prompts": {"instructions": 4, "max_instructions": 2},
        "rloo": {**rl, "learning_rate": 0.001},
        "eval": {
            "reasoning": {"limit": 2, "samples": 1, "max_new_tokens_on": 6, "max_new_tokens_off": 6},
            "if_suite": str(REPO / "recipes" / "if-heldout.jsonl"),
            "if_options": {"limit": 2, "samples": 1, "max_new_tokens_on": 6, "max_new_tokens_off": 6},
            "mc_tasks": [str(REPO / "tests" / "data" / "mc_sample.jsonl")],
            "mc_limit": 4,
            "speed": {"batch_sizes": [1], "prompt_len": 8, "gen_len": 32, "repeats": 1, "memory": False},
        },
        "export": {"gguf_dtype": "f32", "gguf_tokenizer_pre": "gpt-2", "vllm_dtype": "float32"},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# The run in its own process (so that it can be killed), with Puzzle's deterministic costs timer of the Puzzle
# tests: on a tiny model, measured costs are timing noise and could change which child the search picks.
DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from test_puzzle_pipeline import params_timer
from models_for_tests import tiny_llama_config
from open_nemotron.pipeline import load_recipe, run
recipe, base = load_recipe({recipe!r})
timer = params_timer(tiny_llama_config(num_hidden_layers=3), 2)
run(recipe, {run_dir!r}, base=base, progress=False, puzzle_timer=timer)
"""


def _run(recipe: Path, run_dir: Path, cli: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cli:
        command = [sys.executable, "-m", "open_nemotron.cli", "run", str(recipe), "--run-dir", str(run_dir), "--quiet"]
    else:
        code = DRIVER.format(tests=str(REPO / "tests"), recipe=str(recipe), run_dir=str(run_dir))
        command = [sys.executable, "-c", code]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=1800)
    assert process.returncode == 0, out
    return out


def _artifacts(run_dir: Path) -> dict[str, str]:
    """What a run's result is made of: every model's weights (by content) and the measured numbers (not timings)."""
    import hashlib

    out = {}
    for weights in sorted(run_dir.rglob("final/model.safetensors")) + sorted(run_dir.glob("parent/*.safetensors")):
        out[str(weights.relative_to(run_dir))] = hashlib.sha256(weights.read_bytes()).hexdigest()
    report = json.loads((run_dir / "report.json").read_text())
    for key in ("parameters", "quality", "retention", "reasoning", "instructions"):
        out[key] = json.dumps(report[key], sort_keys=True)
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    recipe = tiny_recipe(root)
    run_dir = root / "run"
    first = _finish(_run(recipe, run_dir))
    return recipe, run_dir, first


@pytest.mark.slow
def test_every_stage_runs_and_the_report_tells_the_story(finished):
    _, run_dir, _ = finished
    report = json.loads((run_dir / "report.json").read_text())
    assert report["parameters"]["child"] < report["parameters"]["parent"]
    assert set(report["speed"]) == {"parent", "child"}
    assert set(report["reasoning"]["models"]) == {
        "child after SFT",
        "child after RL",
        "parent after SFT",
        "parent after RL",
    }
    assert "on" in report["instructions"]["models"]["child after RL"]
    assert set(report["retention"]) == {"parent", "child (Puzzle)", "child after KD"}
    assert report["retention"]["parent"]["retention"] == pytest.approx(1.0)
    assert "child after KD (KD's reporting set)" in report["quality"]
    # The tiny tokenizer has no BPE merges and the child has linear blocks: both exports refuse, and the report says
    # why instead of failing the run.
    assert "no BPE merges" in report["exports"]["gguf"]["refused"]
    assert "no linear blocks" in report["exports"]["vllm"]["refused"]
    markdown = (run_dir / "report.md").read_text()
    for heading in ("Parent vs child", "Reasoning on / off", "Instruction following", "Exports", "Where the time"):
        assert heading in markdown
    assert (run_dir / "report-time.png").is_file() and (run_dir / "report-reasoning.png").is_file()
    stages = json.loads((run_dir / "stages.json").read_text())
    for step in ("convert", "puzzle", "distill", "sft:child", "sft:parent", "pass-rate:child", "grpo:parent"):
        assert stages[step]["finished"]
    # Finished Trainer steps keep their results, not their resume state (keep_checkpoints is off by default).
    for trained in ("distill", "sft/child", "grpo/parent", "rloo/child"):
        assert (run_dir / trained / "final").is_dir() and not list((run_dir / trained).glob("checkpoint-*"))


@pytest.mark.slow
def test_rerunning_a_finished_run_does_nothing(finished):
    recipe, run_dir, _ = finished
    before = (run_dir / "stages.json").read_text()
    out = _finish(_run(recipe, run_dir, cli=True))  # the verb a user types; nothing to do, so no timer needed
    assert (run_dir / "stages.json").read_text() == before
    steps = [line for line in out.splitlines() if ": " in line and not line.startswith("report:")]
    assert steps and all(line.endswith("up to date") for line in steps), out


@pytest.mark.slow
def test_a_run_killed_mid_stage_completes_with_the_same_artifacts(finished, tmp_path):
    """kill -9 while GRPO trains the child (a checkpoint written, the stage not finished), then rerun."""
    recipe, reference_dir, _ = finished
    run_dir = tmp_path / "run"
    process = _run(recipe, run_dir)
    marker = run_dir / "grpo" / "child" / "checkpoint-1"
    deadline = time.monotonic() + 1800
    while not marker.exists() and process.poll() is None:
        assert time.monotonic() < deadline, "the run never reached GRPO"
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stages = json.loads((run_dir / "stages.json").read_text())
    assert not stages["grpo:child"]["finished"] and not (run_dir / "report.json").exists()
    _finish(_run(recipe, run_dir))
    assert _artifacts(run_dir) == _artifacts(reference_dir)


def recipes_with_task_files(root: Path) -> Path:
    """A copy of recipes/ beside stand-in multiple-choice task files where `make mc-tasks` writes them (a fresh
    clone has none; `make demo` writes them before it runs): the recipes' own paths then resolve."""
    import shutil

    shutil.copytree(REPO / "recipes", root / "recipes")
    (root / "runs" / "mc-tasks").mkdir(parents=True)
    for task in ("arc_easy", "piqa", "hellaswag"):
        (root / "runs" / "mc-tasks" / f"{task}.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n')
    return root / "recipes"


def test_recipes_in_the_repository_load(tmp_path):
    recipes = recipes_with_task_files(tmp_path)
    for name in ("demo.yaml", "demo-quick.yaml", "llama-3.1-8b.yaml"):
        recipe, _ = load_recipe(recipes / name)
        assert recipe.models
    demo, _ = load_recipe(recipes / "demo.yaml")
    assert len(demo.eval.mc_tasks) == 3
    assert distill_section(demo)["seed"] == 1  # other text than Puzzle's calibration (seed 0)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"distill": {"learning_rate": -1}}, "distill.learning_rate = -1.0: expected a positive number"),
        ({"distill": {"student": "x"}}, "distill.student: set by the recipe itself"),
        ({"sft": {"max_stepz": 3}}, "sft.max_stepz: unknown field; expected one of batch_size"),
        ({"grpo": {"num_generations": 1}}, "grpo.num_generations = 1: expected at least 2"),
        ({"eval": {"speed": {"batch_sizes": "x"}}}, "eval.speed.batch_sizes = 'x': expected a list"),
        ({"models": ["child", "kid"]}, "models = ['child', 'kid']: expected distinct names"),
        ({"export": {"gguf_dtype": "q4"}}, "export.gguf_dtype = 'q4': expected one of f32, f16, q8_0"),
        ({"child": None}, "child: missing"),
        ({"puzzle": "nope.yaml"}, "puzzle = 'nope.yaml': no such Puzzle YAML"),
        ({"datagen": {"tasks": ["nope"]}}, "datagen.tasks = ['nope']: expected names from"),
        ({"seed": "x"}, "seed = 'x': expected an integer"),
        ({"puzzle": None}, "models: 'child' needs a puzzle section"),
        ({"datagen": None}, "datagen: null skips SFT"),
        ({"distill": {"seed": 0}}, "distill.seed = 0: the seed of Puzzle's calibration text"),
        ({"seed": -1}, "distill.seed = 0: the seed of Puzzle's calibration text"),
    ],
)
def test_a_bad_recipe_is_refused_with_the_field(patch, message, tmp_path):
    recipes = recipes_with_task_files(tmp_path)
    base = yaml.safe_load((recipes / "demo.yaml").read_text())
    data = {**base, **patch}
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data, recipes)
    assert message in str(err.value)
