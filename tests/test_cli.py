"""The `open-nemotron` CLI through typer's CliRunner, on tiny random checkpoints saved to temporary directories."""

from __future__ import annotations

import functools
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from models_for_tests import save_tiny_llama, tiny_llama_config
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from open_nemotron.cli import app, parse_positive_ints
from open_nemotron.errors import OpenNemotronError
from open_nemotron.model.chat import has_reasoning_template
from open_nemotron.model.modeling import DeciLMForCausalLM

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("parent") / "tiny-llama")


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_convert_writes_a_model_auto_loads_as_decilm(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    result = invoke("convert", tiny_llama_dir, "--out", out, "--non-portable-ffn-widths")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout

    converted = AutoModelForCausalLM.from_pretrained(out)
    parent = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert isinstance(converted, DeciLMForCausalLM)
    ids = torch.randint(3, 259, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, parent(ids).logits)
    assert has_reasoning_template(AutoTokenizer.from_pretrained(out))


def panels(stdout: str) -> dict[str, str]:
    """The text inside each rich panel of `stdout`, by title, wrapped lines joined with spaces."""
    found: dict[str, list[str]] = {}
    title = None
    for line in stdout.splitlines():
        if line.startswith("╭─ "):
            title = line[3:].split(" ", 1)[0]
            found[title] = []
        elif line.startswith("│ ") and title is not None:
            found[title].append(line[2:-1].strip())
        elif line.startswith("╰"):
            title = None
    return {t: " ".join(lines) for t, lines in found.items()}


def squeeze(text: str) -> str:
    return "".join(text.split())  # rich re-wraps long text: compare without whitespace


def greedy_reference(model_dir: Path, prompt: str, thinking: bool, max_new_tokens: int) -> str:
    """Greedy decoding written out (argmax of a full forward pass per step), the reply decoded without specials."""
    from open_nemotron.model.chat import ensure_reasoning_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ensure_reasoning_template(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1)).logits[0, -1].argmax())
            if token == tokenizer.convert_tokens_to_ids("<|im_end|>"):
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("thinking", ["on", "off"])
def test_generate_prints_the_answer(tiny_llama_dir: Path, thinking: str) -> None:
    args = ["--prompt", "What is 2+2?", "--thinking", thinking, "--max-new-tokens", "6", "--seed", "0"]
    result = invoke("generate", tiny_llama_dir, *args, "--device", "cpu")
    assert result.exit_code == 0, result.output
    expected = "sampling (temperature 0.6, top-p 0.95)" if thinking == "on" else "greedy"
    assert f"thinking {thinking}: {expected}" in result.stderr
    printed = panels(result.stdout)
    assert "answer" in printed
    if thinking == "off":  # greedy: the reply is fixed by the weights
        reply = greedy_reference(tiny_llama_dir, "What is 2+2?", False, 6)
        assert reply.strip() and "<think>" not in reply
        assert list(printed) == ["answer"] and squeeze(printed["answer"]) == squeeze(reply)
    else:  # sampled: the same seed gives the same reply through the library (our class, on the engine)
        from open_nemotron.model.chat import ensure_reasoning_template, generate_chat, uses_engine
        from open_nemotron.model.chat_template import split_reasoning
        from open_nemotron.model.loading import load_model

        tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
        ensure_reasoning_template(tokenizer)
        model = load_model(tiny_llama_dir, device="cpu", implementation="ours")
        assert uses_engine(model)
        (reply,) = generate_chat(
            model, tokenizer, [[{"role": "user", "content": "What is 2+2?"}]], thinking=True, max_new_tokens=6, seed=0
        )
        reasoning, answer = split_reasoning(reply)
        assert squeeze(printed["answer"]) == squeeze(answer)
        assert ("reasoning" in printed) is (reasoning is not None)


def test_generate_prints_reasoning_and_answer_apart_and_literally(tiny_llama_dir: Path, monkeypatch) -> None:
    from open_nemotron.model import chat

    calls = []

    def scripted(model, tokenizer, conversations, **kwargs):
        calls.append((conversations, kwargs))
        return ["<think>\nI add [bold]2[/bold] and 2.\n</think>\n\nThe answer is [red]4[/red]."]

    monkeypatch.setattr(chat, "generate_chat", scripted)
    args = ["--prompt", "What is 2+2?", "--max-new-tokens", "5", "--seed", "3", "--reasoning-budget", "4"]
    result = invoke("generate", tiny_llama_dir, *args)
    assert result.exit_code == 0, result.output
    # Model text is never read as rich markup.
    assert panels(result.stdout) == {
        "reasoning": "I add [bold]2[/bold] and 2.",
        "answer": "The answer is [red]4[/red].",
    }
    assert result.stdout.index("reasoning") < result.stdout.index("answer")
    ((conversations, kwargs),) = calls
    assert conversations == [[{"role": "user", "content": "What is 2+2?"}]]
    assert kwargs == dict(
        thinking=True, max_new_tokens=5, do_sample=True, temperature=0.6, top_p=0.95, seed=3, reasoning_budget=4
    )
    refused = invoke("generate", tiny_llama_dir, "--prompt", "hi", "--reasoning-budget", "-2")
    assert refused.exit_code != 0 and "--reasoning-budget -2: expected an integer >= 0" in refused.output


def test_bench_speed_writes_json_and_markdown(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import open_nemotron.evaluate.throughput as throughput

    # The real bandwidth probe streams a GiB; a few MiB exercise the same code path.
    monkeypatch.setattr(
        throughput,
        "measure_memory_bandwidth",
        functools.partial(throughput.measure_memory_bandwidth, buffer_mib=4, repeats=1),
    )
    # Deterministic timings (the code under test is the bookkeeping, not the clock): prefill 10 ms, then 10 ms per
    # decode step.
    monkeypatch.setattr(
        throughput, "timed_prefill_and_decode", lambda model, ids, new_tokens, device: (0.01, 0.01 * (new_tokens - 1))
    )
    json_out = tmp_path / "speed.json"
    result = invoke(
        "bench-speed",
        tiny_llama_dir,
        f"ours:{tiny_llama_dir}",
        "--batch-sizes",
        "1",
        "--prompt-len",
        "8",
        "--gen-len",
        "4",
        "--repeats",
        "1",
        "--no-memory",
        "--device",
        "cpu",
        "--json",
        json_out,
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(json_out.read_text())
    assert [m["spec"] for m in saved["models"]] == [str(tiny_llama_dir), f"ours:{tiny_llama_dir}"]
    assert json_out.with_suffix(".md").read_text().startswith("# bench-speed")
    assert "bench-speed" in result.stdout
    batch = saved["models"][0]["batches"]["1"]
    assert batch["decode_ms_per_step"] == pytest.approx(10.0)
    assert batch["decode_tokens_per_s"] == pytest.approx(100.0)
    assert batch["prefill_tokens_per_s"] == pytest.approx(8 / 0.01)


def test_bench_train_passes_its_options_through(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    calls: dict = {}

    def fake_run(config):
        calls["config"] = config
        return {"rows": 1}

    fake = types.ModuleType("open_nemotron.evaluate.train_speed")
    fake.TrainSpeedConfig = lambda **kwargs: kwargs
    fake.run = fake_run
    fake.render_table = lambda result: "TRAIN TABLE"
    fake.render_markdown = lambda result: "# bench-train\n"
    monkeypatch.setitem(sys.modules, "open_nemotron.evaluate.train_speed", fake)
    json_out = tmp_path / "train.json"
    specs = [str(tiny_llama_dir), f"transformers:{tiny_llama_dir}"]
    result = invoke(
        "bench-train",
        *specs,
        "--batch",
        "2",
        "--seq",
        "16",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--json",
        json_out,
    )
    assert result.exit_code == 0, result.output
    assert calls["config"] == dict(
        models=specs, batch=2, seq=16, steps=1, repeats=1, device="cpu", seed=3, json_out=str(json_out)
    )
    assert "TRAIN TABLE" in result.stdout
    # run() writes the JSON and the Markdown beside it (tested with the real bench-speed); the CLI names both.
    assert f"wrote {json_out} and {json_out.with_suffix('.md')}" in result.stdout


def write_config(directory: Path, config: dict) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def truncated_copy(src: Path, directory: Path) -> Path:
    directory.mkdir()
    for f in src.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return directory


BAD_MODELS = {
    "missing": (lambda tmp, parent: tmp / "no-such-model", ["no such directory or file"]),
    "gpt2": (
        lambda tmp, parent: write_config(tmp / "gpt2", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}),
        ["unsupported architecture model_type 'gpt2' (GPT2LMHeadModel)", "LlamaForCausalLM"],
    ),
    "qwen2_moe": (
        lambda tmp, parent: write_config(
            tmp / "moe", {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]}
        ),
        ["unsupported architecture model_type 'qwen2_moe'"],
    ),
    "truncated": (lambda tmp, parent: truncated_copy(parent, tmp / "truncated"), ["corrupt safetensors file"]),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
@pytest.mark.parametrize("verb", ["convert", "generate", "bench-speed"])
def test_bad_models_are_one_line_errors(case: str, verb: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    make, fragments = BAD_MODELS[case]
    model = make(tmp_path, tiny_llama_dir)
    extra = {
        "convert": ["--out", tmp_path / "out"],
        "generate": ["--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"],
        "bench-speed": ["--batch-sizes", "1", "--no-memory", "--device", "cpu"],
    }[verb]
    assert_one_line_error(invoke(verb, model, *extra), str(model) if case != "missing" else "", *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["bench-speed", "m", "--batch-sizes", "1,x"], ["--batch-sizes '1,x'", "comma-separated positive integers"]),
        (["bench-speed", "m", "--batch-sizes", "0"], ["--batch-sizes '0'"]),
        (["bench-speed", "m", "--batch-sizes", ""], ["--batch-sizes ''"]),
        (["bench-speed", "m", "--device", "tpu"], ["--device 'tpu'", "cpu, cuda or cuda:N"]),
        (["bench-speed", "m", "--json", "r.md"], ["--json 'r.md'", ".json"]),
        (["bench-speed", "m", "--batch-sizes", "1", "--prompt-len", "0", "--device", "cpu"], ["prompt_len = 0"]),
        (["generate", "m", "--prompt", "hi", "--thinking", "maybe"], ["--thinking 'maybe'", "on or off"]),
        (["generate", "m", "--prompt", "hi", "--max-new-tokens", "0"], ["--max-new-tokens 0"]),
        (["generate", "m", "--prompt", "hi", "--temperature", "-1"], ["temperature = -1.0"]),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(invoke(*args), *fragments)


def test_parse_positive_ints() -> None:
    assert parse_positive_ints("--batch-sizes", "1, 16") == [1, 16]
    with pytest.raises(OpenNemotronError, match=r"--x '1,,2'"):
        parse_positive_ints("--x", "1,,2")


@pytest.mark.parametrize(
    ("yaml_text", "fragments"),
    [
        ("bld:\n  learning_rat: 0.1\n", ["bld.learning_rat: unknown field"]),
        ("search:\n  alpha: 2\n", ["search.alpha = 2.0", "[0, 1]"]),
        ("score:\n  metric: bleu\n", ["score.metric = 'bleu'"]),
        ("search:\n  targets: []\n", ["search.targets = []"]),
        ("parent: [unclosed\n", ["not valid YAML"]),
    ],
)
@pytest.mark.parametrize("verb", ["run", "costs"])
def test_bad_puzzle_configs_are_one_line_errors(
    yaml_text: str, fragments: list[str], verb: str, tmp_path: Path
) -> None:
    config = tmp_path / "puzzle.yaml"
    config.write_text(yaml_text)
    result = invoke("puzzle", verb, "--config", config, "--run-dir", tmp_path / "run")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "run").exists()  # nothing written for a config that cannot be used


def test_puzzle_stage_without_its_inputs_names_the_missing_stage(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "puzzle.yaml"
    config.write_text(f"parent: {tiny_llama_dir}\ndevice: cpu\n")
    result = invoke("puzzle", "search", "--config", config, "--run-dir", tmp_path / "run")
    assert_one_line_error(result, "costs.json: missing", "puzzle costs")


def test_datagen_sft_eval_through_the_cli(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The reasoning pipeline's three verbs on tiny data and a tiny model; each one's artifacts and their content."""
    from open_nemotron.data.schema import load_examples
    from open_nemotron.data.tasks import make_items, score_answer
    from open_nemotron.rewards.format import is_toggle_compliant

    data_dir = tmp_path / "data"
    result = invoke(
        "datagen", "--out", data_dir, "--tasks", "chain_sum,gcd", "--n-per-task", "3", "--difficulties", "easy"
    )
    assert result.exit_code == 0, result.output
    for name in ("raw.jsonl", "data.jsonl", "data_report.json", "data_report.md", "generation.json"):
        assert (data_dir / name).is_file(), name
    items = {item.question: item for task in ("chain_sum", "gcd") for item in make_items(task, 3, difficulty="easy")}
    rows, report = load_examples(data_dir / "data.jsonl")
    assert not report.dropped
    summary = json.loads((data_dir / "datagen_summary.json").read_text())
    assert summary["raw_rows"] == 12 and summary["kept_rows"] == len(rows) and len(rows) >= 10
    assert f"kept {len(rows)} of 12 rows" in result.stdout
    for row in rows:  # each row answers one of the items, right, in its mode's layout
        item = items[row.input[-1]["content"]]
        assert row.answer == item.answer and score_answer(item, row.output) == 1.0
        assert is_toggle_compliant(row.output, row.reasoning == "on")
    assert {row.reasoning for row in rows} == {"on", "off"}
    assert json.loads((data_dir / "generation.json").read_text())["generated"] == 12

    sft_dir = tmp_path / "sft"
    sft_args = ["--data", data_dir / "data.jsonl", "--out", sft_dir, "--max-steps", "2", "--batch-size", "4"]
    sft_args += ["--save-steps", "2", "--lr", "1e-3", "--device", "cpu"]
    # Prompts longer than max_length leave no answer token to train on: a one-line error, not a torch traceback.
    refused = invoke("sft", tiny_llama_dir, *sft_args, "--max-length", "16")
    assert refused.exit_code == 2, refused.output
    assert refused.exception is None or isinstance(refused.exception, SystemExit)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "max_length = 16" in errors[0] and "Traceback" not in refused.output
    result = invoke("sft", tiny_llama_dir, *sft_args, "--max-length", "512")
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.stdout
    trained = json.loads((sft_dir / "sft_summary.json").read_text())
    assert trained["steps"] == 2 and trained["rows"] == len(rows)
    assert trained["rows_on"] == sum(row.reasoning == "on" for row in rows)
    assert (sft_dir / "checkpoint-2" / "trainer_state.json").is_file() and (sft_dir / "sft_report.md").is_file()
    final = sft_dir / "final"
    parent = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tuned = AutoModelForCausalLM.from_pretrained(final)
    assert has_reasoning_template(AutoTokenizer.from_pretrained(final))
    assert not torch.equal(parent.lm_head.weight, tuned.lm_head.weight)  # it trained

    json_out = tmp_path / "eval" / "eval.json"
    result = invoke(
        "eval", final, "--suite", "heldout", "--limit", "2", "--samples", "1", "--max-new-tokens-on", "4",
        "--max-new-tokens-off", "4", "--batch-size", "1", "--device", "cpu", "--json", json_out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    evaluated = json.loads(json_out.read_text())
    modes = evaluated["models"][str(final)]
    assert modes["on"]["n_prompts"] == modes["off"]["n_prompts"] == 2 and "on_minus_off" in modes
    records = [json.loads(line) for line in json_out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 1 + 2
    for mode in ("on", "off"):  # the reported numbers are those of the written generations
        mine = [r for r in records if r["mode"] == mode]
        assert modes[mode]["accuracy"] == sum(r["correct"] for r in mine) / 2
        assert modes[mode]["compliance"] == sum(r["compliant"] for r in mine) / 2
        for r in mine:
            assert r["compliant"] == is_toggle_compliant(r["output"], mode == "on")
    assert json_out.with_suffix(".md").read_text() in result.stdout + "\n"
    assert f"wrote {json_out}" in result.stdout


def test_serve_engine_vllm_checks_before_starting(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """--engine vllm: a one-line reason where vLLM or CUDA is missing or the checkpoint is one vLLM cannot read;
    otherwise the process becomes `vllm serve` with the same options."""
    import importlib.util

    import open_nemotron.serve.vllm_engine as vllm_engine

    real_find_spec = importlib.util.find_spec
    present = {"vllm": False}
    monkeypatch.setattr(
        vllm_engine.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "vllm" and present["vllm"] else real_find_spec(name, *a),
    )
    args = ["--engine", "vllm", "--port", "8123", "--max-batch-size", "4", "--max-length", "512"]
    assert_one_line_error(invoke("serve", tiny_llama_dir, *args), "vLLM is not installed")
    present["vllm"] = True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_one_line_error(invoke("serve", tiny_llama_dir, *args), "no CUDA device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    converted = tmp_path / "converted"
    assert invoke("convert", tiny_llama_dir, "--out", converted, "--non-portable-ffn-widths").exit_code == 0
    assert_one_line_error(invoke("serve", converted, *args), "stock vLLM cannot serve", "not multiples of 256")
    execs = []
    monkeypatch.setattr(vllm_engine.os, "execvp", lambda file, argv: execs.append(argv))
    portable = save_tiny_llama(tmp_path / "portable", tiny_llama_config(intermediate_size=256))
    assert invoke("convert", portable, "--out", tmp_path / "portable-ours").exit_code == 0
    assert invoke("serve", tmp_path / "portable-ours", *args).exit_code == 0  # our format, through vLLM's plugin
    served = execs.pop()
    assert served[served.index("serve") + 1] == str(tmp_path / "portable-ours")
    result = invoke("serve", tiny_llama_dir, *args, "--model-name", "m", "--reasoning-parser", "qwen3")
    assert result.exit_code == 0, result.output
    ((argv,),) = [execs]
    assert argv[argv.index("serve") + 1] == str(tiny_llama_dir)
    flags = dict(zip(argv[argv.index("serve") + 2 :: 2], argv[argv.index("serve") + 3 :: 2], strict=True))
    assert flags == {
        "--host": "127.0.0.1",
        "--port": "8123",
        "--served-model-name": "m",
        "--max-model-len": "512",
        "--max-num-seqs": "4",
        "--reasoning-parser": "qwen3",
    }
    assert_one_line_error(invoke("serve", tiny_llama_dir, "--reasoning-parser", "qwen3"), "for --engine vllm")
    assert_one_line_error(invoke("serve", tiny_llama_dir, "--engine", "tgi"), "expected ours, vllm or llama.cpp")


def test_serve_engine_llama_cpp_refuses_before_starting(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """--engine llama.cpp serves a GGUF file on the CPU: a checkpoint directory, a GPU device or vLLM's parser
    option get a one-line reason (and, without llama-cpp-python, how to install it)."""
    import importlib.util

    assert_one_line_error(invoke("serve", tiny_llama_dir, "--engine", "llama.cpp"), "a directory, not a GGUF file")
    gguf = tmp_path / "child.gguf"
    gguf.write_bytes(b"GGUF" + bytes(12))
    assert_one_line_error(invoke("serve", gguf, "--engine", "llama.cpp", "--device", "cuda"), "runs on the CPU")
    assert_one_line_error(
        invoke("serve", gguf, "--engine", "llama.cpp", "--reasoning-parser", "qwen3"), "for --engine vllm"
    )
    if importlib.util.find_spec("llama_cpp") is None:
        assert_one_line_error(invoke("serve", gguf, "--engine", "llama.cpp"), "make check-gguf")
