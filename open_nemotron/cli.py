"""The `open-nemotron` command line: convert, bench-speed, bench-train, generate, datagen, sft, eval, eval-mc,
distill, fusion, serve, puzzle.

Heavy modules (torch, transformers, the model code) are imported inside each command, so that `--help` and bad
arguments answer without loading them. Bad input ends with one line, ``error: <message>``, on stderr and exit
status 2 (the status click uses for usage errors); a traceback means a bug.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from open_nemotron.errors import OpenNemotronError
from open_nemotron.rewards.functions import parse_reward_weights

USER_ERROR_EXIT_CODE = 2

app = typer.Typer(
    name="open-nemotron",
    help="Llama-Nemotron's pipeline for small Llama models. Verbs: convert (a Llama parent to the "
    "DeciLM format), bench-speed and bench-train (throughput), generate (one answer, reasoning on or off), datagen "
    "(reasoning on/off training data), sft (fine-tuning with the toggle), eval (accuracy with reasoning on and off), "
    "eval-mc (multiple-choice accuracy and retention), distill (knowledge distillation / continued pretraining of a "
    "child), rl (RL prompt sets and pass rates), grpo and rloo (RL with verifiable rewards), rpo (reward-aware preference optimisation), fusion (FFN Fusion: analyze, fuse), serve (an OpenAI-compatible server with the reasoning toggle), export (a checkpoint for vLLM, a GGUF for llama.cpp), "
    "puzzle (Puzzle NAS: run, or one stage: calibration, build-library, score, costs, search, assemble, report).",
    epilog="Run `open-nemotron VERB --help` for a verb's options; README.md has a section and an example per verb.",
    no_args_is_help=True,
    add_completion=False,
    # Locals of a failing frame can hold whole models and tensors: never print them.
    pretty_exceptions_show_locals=False,
)


class CliInputError(OpenNemotronError, ValueError):
    """A command-line option has a value the command cannot use."""


CommandFunction = TypeVar("CommandFunction", bound=Callable[..., Any])


def _one_line(err: BaseException) -> str:
    # Messages are meant to be one line already; collapsing whitespace guarantees it for foreign ones.
    return re.sub(r"\s+", " ", str(err)).strip() or type(err).__name__


def reports_user_errors(command: CommandFunction) -> CommandFunction:
    """Turn `OpenNemotronError` and `FileNotFoundError` into ``error: <message>`` on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (OpenNemotronError, FileNotFoundError) as err:
            typer.echo(f"error: {_one_line(err)}", err=True)
            raise typer.Exit(USER_ERROR_EXIT_CODE) from None

    return wrapper  # type: ignore[return-value]


def parse_positive_ints(option: str, value: str) -> list[int]:
    """``"1,16"`` -> ``[1, 16]``; anything else is a `CliInputError` naming the option and the value."""
    items = [item.strip() for item in value.split(",")]
    if not all(re.fullmatch(r"\d+", item) and int(item) > 0 for item in items):
        raise CliInputError(f"{option} {value!r}: expected comma-separated positive integers, e.g. 1,16")
    return [int(item) for item in items]


def parse_switch(option: str, value: str) -> bool:
    """``on`` -> True, ``off`` -> False (case-insensitive)."""
    switch = value.strip().lower()
    if switch not in ("on", "off"):
        raise CliInputError(f"{option} {value!r}: expected on or off")
    return switch == "on"


def check_device(value: str | None) -> str | None:
    """``cpu``, ``cuda`` or ``cuda:N`` (CUDA only where available); None picks CUDA when present, else CPU."""
    if value is None:
        return None
    if value == "cpu":
        return value
    if not re.fullmatch(r"cuda(:\d+)?", value):
        raise CliInputError(f"--device {value!r}: expected cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise CliInputError(f"--device {value!r}: CUDA is not available on this machine; use --device cpu")
    return value


def markdown_path_beside(json_path: Path) -> Path:
    """Where the Markdown report of a `--json` result goes: same name, suffix .md."""
    if json_path.suffix == ".md":
        raise CliInputError(f"--json '{json_path}': expected a .json path (the Markdown report is written beside it)")
    return json_path.with_suffix(".md")


def _results_console():
    from rich.console import Console

    # Result tables are wide; when stdout is not a terminal (make, CI logs) rich would squeeze them to 80 columns.
    console = Console()
    return console if console.is_terminal else Console(width=200)


def _stderr_console():
    from rich.console import Console

    # Progress and notes go to stderr so stdout carries only the results.
    return Console(stderr=True, highlight=False)


def check_model_specs(specs: list[str]) -> None:
    """Resolve every spec and check its config and weights before a benchmark starts.

    A bad last model then fails in seconds rather than after the others have loaded, and a GGUF parent is
    dequantised (once, cached) under a spinner rather than silently inside the benchmark.
    """
    from open_nemotron.evaluate.throughput import split_spec
    from open_nemotron.model.loading import check_architecture, read_config, resolve_model_dir, safetensors_files

    with _stderr_console().status("checking models ...") as status:
        for spec in specs:
            status.update(f"checking {spec} ...")
            model_dir = resolve_model_dir(split_spec(spec)[1])
            check_architecture(read_config(model_dir), str(model_dir))
            safetensors_files(model_dir)


ModelSpecs = Annotated[
    list[str],
    typer.Argument(
        metavar="MODEL",
        help="Model specs: a model directory, a .gguf file, the alias smollm2-135m or a hub id (org/name); "
        "prefix ours: or transformers: to pick the implementation for a Llama checkpoint.",
        show_default=False,
    ),
]
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu).")
]
JsonOption = Annotated[
    Path | None,
    typer.Option("--json", help="Write the result as JSON here and a Markdown report beside it (.md).", dir_okay=False),
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for the random benchmark inputs.")]
ReasoningBudgetOption = Annotated[
    int | None,
    typer.Option(
        "--reasoning-budget",
        help="Most tokens in a think block: the engine then writes </think> and the model answers (default: none).",
        show_default=False,
    ),
]


def check_reasoning_budget(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise CliInputError(f"--reasoning-budget {value}: expected an integer >= 0")
    return value


@app.command()
@reports_user_errors
def convert(
    src: Annotated[
        str,
        typer.Argument(
            help="Parent spec: a model directory, a .gguf file, the alias smollm2-135m or a hub id.", show_default=False
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the converted model to.", file_okay=False)],
    non_portable_ffn_widths: Annotated[
        bool,
        typer.Option(
            "--non-portable-ffn-widths",
            help="Accept an FFN width that is not a multiple of 256 (recorded in config.json; NVIDIA's code, vLLM "
            "and llama.cpp then build a different FFN, so only open-nemotron reads the output).",
        ),
    ] = False,
) -> None:
    """Write a Llama parent in the DeciLM (nemotron-nas) format, with the reasoning-toggle chat template."""
    from open_nemotron.model.loading import convert as convert_model

    with _stderr_console().status(f"converting {src} ..."):
        written = convert_model(src, out, non_portable_ffn_widths=non_portable_ffn_widths)
    typer.echo(f"wrote {written}")


@app.command("bench-speed")
@reports_user_errors
def bench_speed(
    models: ModelSpecs,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "1,16",
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Prompt tokens.")] = 128,
    gen_len: Annotated[int, typer.Option("--gen-len", help="Generated tokens (EOS off).")] = 128,
    repeats: Annotated[int, typer.Option("--repeats", help="Interleaved repeats; medians are reported.")] = 3,
    memory: Annotated[
        bool, typer.Option("--memory/--no-memory", help="Measure peak memory (one fresh process per model and batch).")
    ] = True,
    device: DeviceOption = None,
    seed: SeedOption = 0,
    json_out: JsonOption = None,
) -> None:
    """Prefill/decode throughput, peak memory and KV-cache cost of models, interleaved in one process."""
    sizes = parse_positive_ints("--batch-sizes", batch_sizes)
    device = check_device(device)
    markdown_out = markdown_path_beside(json_out) if json_out is not None else None

    from open_nemotron.evaluate.throughput import SpeedConfig, render_table, run

    config = SpeedConfig(
        models=list(models),
        batch_sizes=sizes,
        prompt_len=prompt_len,
        gen_len=gen_len,
        repeats=repeats,
        memory=memory,
        device=device,
        seed=seed,
        json_out=str(json_out) if json_out is not None else None,
    )
    check_model_specs(list(models))
    result = run(config)
    _results_console().print(render_table(result))
    if json_out is not None:
        typer.echo(f"wrote {json_out} and {markdown_out}")


@app.command("bench-train")
@reports_user_errors
def bench_train(
    models: ModelSpecs,
    batch: Annotated[int, typer.Option("--batch", help="Sequences per training step.")] = 4,
    seq: Annotated[int, typer.Option("--seq", help="Tokens per sequence.")] = 256,
    steps: Annotated[int, typer.Option("--steps", help="Training steps per measurement.")] = 3,
    repeats: Annotated[int, typer.Option("--repeats", help="Interleaved repeats; medians are reported.")] = 2,
    device: DeviceOption = None,
    seed: SeedOption = 0,
    json_out: JsonOption = None,
) -> None:
    """Training-step throughput (forward, backward, AdamW) and FLOP rate of models, interleaved in one process."""
    device = check_device(device)
    markdown_out = markdown_path_beside(json_out) if json_out is not None else None

    from open_nemotron.evaluate.train_speed import TrainSpeedConfig, render_table, run

    config = TrainSpeedConfig(
        models=list(models),
        batch=batch,
        seq=seq,
        steps=steps,
        repeats=repeats,
        device=device,
        seed=seed,
        json_out=str(json_out) if json_out is not None else None,
    )
    check_model_specs(list(models))
    result = run(config)
    _results_console().print(render_table(result))
    if json_out is not None:
        typer.echo(f"wrote {json_out} and {markdown_out}")


@app.command()
@reports_user_errors
def generate(
    model_spec: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="Model spec: a model directory, a .gguf file, the alias smollm2-135m or a hub id.",
            show_default=False,
        ),
    ],
    prompt: Annotated[str, typer.Option("--prompt", help="The user message.", show_default=False)],
    thinking: Annotated[str, typer.Option("--thinking", help="Reasoning switch: on or off.")] = "on",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate.")] = 512,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature",
            help="Sampling temperature; 0 = greedy (default: 0.6 with thinking on, greedy with thinking off).",
            show_default=False,
        ),
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option("--top-p", help="Nucleus sampling mass (default 0.95 when sampling).", show_default=False),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for reproducible sampling.")] = None,
    reasoning_budget: ReasoningBudgetOption = None,
    device: DeviceOption = None,
) -> None:
    """Answer one prompt with reasoning on or off; prints the reasoning and the answer separately."""
    thinking_on = parse_switch("--thinking", thinking)
    device = check_device(device)

    from open_nemotron.model.chat import ChatGenerationError, ensure_reasoning_template, generate_chat, resolve_sampling

    # Check the decoding settings before spending time on loading the model.
    if max_new_tokens < 1:
        raise ChatGenerationError(f"--max-new-tokens {max_new_tokens}: expected a positive integer")
    sampling = resolve_sampling(thinking_on, temperature=temperature, top_p=top_p)
    check_reasoning_budget(reasoning_budget)

    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    from open_nemotron.model.chat_template import split_reasoning
    from open_nemotron.model.loading import load_model, load_tokenizer

    status_console = _stderr_console()
    with status_console.status(f"loading {model_spec} ..."):
        # One conversation decodes one row at a time: the batch-1 weight layout (CPU; ignored elsewhere). A Llama
        # checkpoint goes into our class (same weights and logits), which generates on the engine.
        model = load_model(model_spec, device=device, implementation="ours", decode_layout="gemv")
        tokenizer = load_tokenizer(model_spec)
        ensure_reasoning_template(tokenizer)
    status_console.print(f"thinking {'on' if thinking_on else 'off'}: {sampling.describe()}")
    with status_console.status(f"generating up to {max_new_tokens} tokens ..."):
        (reply,) = generate_chat(
            model,
            tokenizer,
            [[{"role": "user", "content": prompt}]],
            thinking=thinking_on,
            max_new_tokens=max_new_tokens,
            do_sample=sampling.do_sample,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=seed,
            reasoning_budget=reasoning_budget,
        )
    reasoning, answer = split_reasoning(reply)
    # Text(...) rather than str: model output must never be read as rich markup.
    console = Console()
    if reasoning is not None:
        console.print(Panel(Text(reasoning), title="reasoning", title_align="left"))
    console.print(Panel(Text(answer), title="answer", title_align="left"))


@app.command()
@reports_user_errors
def datagen(
    out: Annotated[
        Path, typer.Option("--out", help="Output directory (raw.jsonl, data.jsonl, data_report.md).", file_okay=False)
    ],
    teacher: Annotated[
        str, typer.Option("--teacher", help="builtin | openai:BASE_URL::MODEL | hf:MODEL_SPEC")
    ] = "builtin",
    tasks: Annotated[
        str | None,
        typer.Option("--tasks", help="Comma-separated task names (default: every task with a built-in solver)."),
    ] = None,
    n_per_task: Annotated[int, typer.Option("--n-per-task", help="Prompts per task.")] = 100,
    difficulties: Annotated[
        str, typer.Option("--difficulties", help="Comma-separated: easy,medium,hard.")
    ] = "easy,medium",
    reasoning: Annotated[
        str, typer.Option("--reasoning", help="Answer modes to generate: on,off / on / off.")
    ] = "on,off",
    concurrency: Annotated[int, typer.Option("--concurrency", help="Parallel requests (openai teacher).")] = 8,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per request (openai teacher).")] = 120.0,
    seed: SeedOption = 0,
) -> None:
    """Reasoning on/off training data from a teacher, filtered (verification, length, dedup, decontamination)."""
    modes = [m.strip() for m in reasoning.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        raise CliInputError(f"--reasoning {reasoning!r}: expected on,off or on or off")
    from open_nemotron.data.datagen import DatagenConfig, run

    options = {"concurrency": concurrency, "timeout_s": timeout} if teacher.startswith("openai:") else {}
    kwargs = {"tasks": [t.strip() for t in tasks.split(",") if t.strip()]} if tasks else {}
    config = DatagenConfig(
        out_dir=str(out),
        n_per_task=n_per_task,
        difficulties=[d.strip() for d in difficulties.split(",") if d.strip()],
        modes=modes,
        teacher=teacher,
        teacher_options=options,
        seed=seed,
        **kwargs,
    )
    summary = run(config)
    typer.echo(
        f"{summary['generation']}\nkept {summary['kept_rows']} of {summary['raw_rows']} rows "
        f"({summary['kept_on']} on, {summary['kept_off']} off) -> {summary['data']}; report {summary['report']}"
    )


@app.command()
@reports_user_errors
def sft(
    model_spec: Annotated[
        str, typer.Argument(metavar="MODEL", help="Model to fine-tune (any model spec).", show_default=False)
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Training rows: jsonl/parquet of Llama-Nemotron-style rows (e.g. datagen output) or a hub dataset id.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Run directory (checkpoints, final/, reports).", file_okay=False)],
    epochs: Annotated[float, typer.Option("--epochs", help="Passes over the data.")] = 2.0,
    max_steps: Annotated[
        int, typer.Option("--max-steps", help="Stop after this many steps (overrides --epochs).")
    ] = -1,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (linear warm-up, then cosine).")] = 1e-4,
    warmup_ratio: Annotated[float, typer.Option("--warmup-ratio", help="Share of steps spent warming up.")] = 0.1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per device step.")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.")] = 1,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per sequence (truncation/packing).")] = 512,
    packing: Annotated[bool, typer.Option("--packing/--no-packing", help="Pack rows into full sequences.")] = False,
    on_fraction: Annotated[
        float | None, typer.Option("--on-fraction", help="Share of reasoning-on rows after mixing (default: as is).")
    ] = None,
    save_steps: Annotated[int, typer.Option("--save-steps", help="Checkpoint every N steps.")] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Seed for shuffling and mixing.")] = 0,
    device: DeviceOption = None,
) -> None:
    """Supervised fine-tuning with the reasoning toggle (TRL SFTTrainer, assistant-only loss); resumes a killed run."""
    device = check_device(device)
    from open_nemotron.train.sft import SFTRunConfig, run

    config = SFTRunConfig(
        model=model_spec,
        data=data,
        output_dir=str(out),
        epochs=epochs,
        max_steps=max_steps,
        learning_rate=lr,
        warmup_ratio=warmup_ratio,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length,
        packing=packing,
        on_fraction=on_fraction,
        seed=seed,
        save_steps=save_steps,
        device=device,
    )
    summary = run(config)
    typer.echo(
        f"trained {summary['steps']} steps, loss {summary['first_loss']} -> {summary['last_loss']}; "
        f"model in {summary['final_model']}, report in {out / 'sft_report.md'}"
    )


@app.command()
@reports_user_errors
def distill(
    student: Annotated[
        str, typer.Option("--student", help="The model to train (a Puzzle or fused child, any model spec).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Run directory (checkpoints, final/, reports).", file_okay=False)],
    teacher: Annotated[
        str | None, typer.Option("--teacher", help="The model to match (the parent); needed for --loss kd.")
    ] = None,
    loss: Annotated[
        str, typer.Option("--loss", help="kd: cosine over layers + KL to the teacher; lm: continued pretraining.")
    ] = "kd",
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="parent (the teacher's own answers, cached), a calibration directory (e.g. a Puzzle run's "
            "calibration/), a .jsonl/.parquet/.txt file or a cached hub dataset id.",
        ),
    ] = "parent",
    text_field: Annotated[str, typer.Option("--text-field", help="jsonl/parquet/hub: the text column.")] = "text",
    cosine_weight: Annotated[float, typer.Option("--cosine-weight", help="Weight of the layer cosine loss.")] = 1.0,
    kl_weight: Annotated[float, typer.Option("--kl-weight", help="Weight of KL(teacher || student).")] = 1.0,
    lm_weight: Annotated[float, typer.Option("--lm-weight", help="Weight of the LM loss (the paper: 0).")] = 0.0,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature of the KL.")] = 1.0,
    train_tokens: Annotated[int, typer.Option("--train-tokens", help="Token budget (sets the step count).")] = 200_000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per device step.")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.")] = 1,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window (data not a calibration dir).")] = 128,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (linear warm-up, then cosine).")] = 1e-4,
    warmup_ratio: Annotated[float, typer.Option("--warmup-ratio", help="Share of steps spent warming up.")] = 0.05,
    train_embeddings: Annotated[
        bool, typer.Option("--train-embeddings/--freeze-embeddings", help="Train the embeddings / LM head too.")
    ] = False,
    train_sequences: Annotated[
        int, typer.Option("--train-sequences", help="Training windows to build (data not a calibration dir).")
    ] = 192,
    reporting_sequences: Annotated[
        int, typer.Option("--reporting-sequences", help="Held-out reporting windows to build.")
    ] = 8,
    generate_prompts: Annotated[
        int, typer.Option("--generate-prompts", help="--data parent: prompts the teacher answers.")
    ] = 80,
    generate_tokens: Annotated[
        int, typer.Option("--generate-tokens", help="--data parent: new tokens per answer.")
    ] = 160,
    generate_free_text: Annotated[
        int,
        typer.Option(
            "--generate-free-text", help="--data parent: plain-text documents the teacher writes on from an opening."
        ),
    ] = 0,
    report_every: Annotated[
        int, typer.Option("--report-every", help="Steps between reporting-set KL / top-1 measurements.")
    ] = 10,
    save_steps: Annotated[int, typer.Option("--save-steps", help="Checkpoint every N steps.")] = 20,
    report_to: Annotated[
        str, typer.Option("--report-to", help="transformers' report_to: none, tensorboard, wandb, ...")
    ] = "none",
    seed: Annotated[int, typer.Option("--seed", help="Seed for data order and generation.")] = 0,
    device: DeviceOption = None,
) -> None:
    """Global knowledge distillation (Puzzle's cosine + KL) or continued pretraining; resumes a killed run."""
    device = check_device(device)
    from open_nemotron.distill import DistillConfig, run

    config = DistillConfig(
        student=student,
        output_dir=str(out),
        teacher=teacher,
        loss=loss,
        data=data,
        text_field=text_field,
        cosine_weight=cosine_weight,
        kl_weight=kl_weight,
        lm_weight=lm_weight,
        temperature=temperature,
        train_tokens=train_tokens,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seq_len=seq_len,
        learning_rate=lr,
        warmup_ratio=warmup_ratio,
        train_embeddings=train_embeddings,
        train_sequences=train_sequences,
        reporting_sequences=reporting_sequences,
        generate_prompts=generate_prompts,
        generate_tokens=generate_tokens,
        generate_free_text=generate_free_text,
        report_every=report_every,
        save_steps=save_steps,
        report_to=report_to,
        seed=seed,
        device=device,
    )
    result = run(config)
    line = f"trained {result['steps']} steps ({result['train_tokens']:,} tokens) in {result['train_seconds']:.0f} s"
    if result["before"] and result["after"]:
        b, a = result["before"], result["after"]
        line += f"; reporting KL {b['kl']:.3f} -> {a['kl']:.3f}, top-1 {b['top1']:.3f} -> {a['top1']:.3f}"
    typer.echo(f"{line}; model in {result['final_model']}, report in {out / 'distill_report.md'}")


@app.command("eval")
@reports_user_errors
def eval_command(
    models: ModelSpecs,
    suite: Annotated[
        str,
        typer.Option(
            "--suite",
            help="'heldout' (report on it), 'validation' (choose on it: same tasks, other seeds), a GSM8K/MATH-style "
            "jsonl or an IFEval-format jsonl (four IFEval accuracies).",
        ),
    ] = "heldout",
    reasoning: Annotated[str, typer.Option("--reasoning", help="Modes to evaluate: on,off / on / off.")] = "on,off",
    samples: Annotated[int, typer.Option("--samples", help="Samples per prompt with reasoning on (avg pass@1).")] = 4,
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate the first N prompts only.")] = None,
    max_new_tokens_on: Annotated[int, typer.Option("--max-new-tokens-on", help="Token budget, reasoning on.")] = 384,
    max_new_tokens_off: Annotated[int, typer.Option("--max-new-tokens-off", help="Token budget, reasoning off.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Engine slots: prompts decoding together.")] = 16,
    reasoning_budget: ReasoningBudgetOption = None,
    padded: Annotated[
        bool, typer.Option("--padded", help="Left-padded generate batches instead of the engine (to compare).")
    ] = False,
    seed: SeedOption = 0,
    device: DeviceOption = None,
    json_out: JsonOption = None,
) -> None:
    """Accuracy with reasoning on (sampled, K per prompt) and off (greedy), compliance and length, per model."""
    modes = [m.strip() for m in reasoning.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        raise CliInputError(f"--reasoning {reasoning!r}: expected on,off or on or off")
    device = check_device(device)
    markdown_out = markdown_path_beside(json_out) if json_out is not None else None
    from open_nemotron.evaluate.reasoning_eval import EvalConfig, render_markdown, run

    config = EvalConfig(
        models=list(models),
        suite=suite,
        reasoning=modes,
        samples=samples,
        limit=limit,
        max_new_tokens_on=max_new_tokens_on,
        max_new_tokens_off=max_new_tokens_off,
        batch_size=batch_size,
        reasoning_budget=check_reasoning_budget(reasoning_budget),
        padded=padded,
        seed=seed,
        device=device,
        json_out=str(json_out) if json_out is not None else None,
    )
    check_model_specs(list(models))
    result = run(config)
    typer.echo(render_markdown(result))
    if markdown_out is not None:
        typer.echo(f"wrote {json_out}, {markdown_out} and {json_out.with_suffix('.samples.jsonl')}")


@app.command("eval-mc")
@reports_user_errors
def eval_mc_command(
    models: ModelSpecs,
    tasks: Annotated[
        str, typer.Option("--tasks", help="Comma-separated task files (.jsonl rows: query, choices, gold).")
    ],
    limit: Annotated[int | None, typer.Option("--limit", help="First N items of every task.")] = None,
    device: DeviceOption = None,
    json_out: JsonOption = None,
) -> None:
    """Multiple-choice log-likelihood accuracy (acc, acc_norm; lm-evaluation-harness definitions) and each model's
    retention of the first model's avg acc_norm."""
    device = check_device(device)
    paths = [t.strip() for t in tasks.split(",") if t.strip()]
    from open_nemotron.evaluate.multiple_choice import MCConfig, render_markdown, run

    config = MCConfig(
        models=list(models),
        tasks=paths,
        limit=limit,
        device=device,
        json_out=str(json_out) if json_out is not None else None,
    )
    check_model_specs(list(models))
    result = run(config)
    typer.echo(render_markdown(result))
    if json_out is not None:
        typer.echo(f"wrote {json_out} and {markdown_path_beside(json_out)}")


@app.command()
@reports_user_errors
def serve(
    model: Annotated[
        str,
        typer.Argument(
            help="Model spec (our format or a Llama parent, loaded into our class); a .gguf file with --engine llama.cpp."
        ),
    ],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Requests decoded together (slots).")] = 8,
    max_length: Annotated[int, typer.Option("--max-length", help="Context per request: prompt + new tokens.")] = 2048,
    queue_size: Annotated[int, typer.Option("--queue-size", help="Open requests before answering 429.")] = 64,
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="The id clients send as `model` (default: the spec).")
    ] = None,
    device: DeviceOption = None,
    shutdown_grace: Annotated[
        float,
        typer.Option("--shutdown-grace", help="Seconds in-flight requests may finish after SIGTERM before cancelling."),
    ] = 30.0,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="ours (this package's engine), vllm (vLLM's server, on a GPU) or llama.cpp (a GGUF file on CPU, "
            "one request at a time; needs llama-cpp-python: make check-gguf).",
        ),
    ] = "ours",
    reasoning_parser: Annotated[
        str | None,
        typer.Option("--reasoning-parser", help="--engine vllm only: vLLM's reasoning parser (see docs/serve.md)."),
    ] = None,
) -> None:
    """An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health) over the
    continuous-batching engine, with the reasoning toggle and reasoning_content (docs/serve.md)."""
    for option, value in (("--max-batch-size", max_batch_size), ("--queue-size", queue_size), ("--port", port)):
        if value < 1:
            raise CliInputError(f"{option} {value}: expected a positive integer")
    if max_length < 2:
        raise CliInputError(f"--max-length {max_length}: expected at least 2")
    if not shutdown_grace >= 0:
        raise CliInputError(f"--shutdown-grace {shutdown_grace}: expected a number of seconds >= 0")
    if engine not in ("ours", "vllm", "llama.cpp"):
        raise CliInputError(f"--engine {engine!r}: expected ours, vllm or llama.cpp")
    if reasoning_parser is not None and engine != "vllm":
        raise CliInputError("--reasoning-parser is for --engine vllm (ours and llama.cpp split reasoning here)")
    if engine == "llama.cpp":
        if device not in (None, "cpu"):
            raise CliInputError(f"--device {device!r}: --engine llama.cpp runs on the CPU (expected cpu or nothing)")
        from open_nemotron.serve.server import serve_gguf

        serve_gguf(model, host, port, max_length, queue_size, model_name, shutdown_grace)
        return
    device = check_device(device)
    check_model_specs([model])
    if engine == "vllm":
        from open_nemotron.serve.vllm_engine import exec_vllm

        exec_vllm(model, host, port, max_batch_size, max_length, model_name, reasoning_parser)
        return
    from open_nemotron.serve.server import serve as run_server

    run_server(model, host, port, max_batch_size, max_length, queue_size, model_name, device, shutdown_grace)


fusion_app = typer.Typer(
    help="FFN Fusion: block-dependency analysis of a model, and fusing runs of attention-free layers into one "
    "wider SwiGLU each (docs/fusion.md).",
    no_args_is_help=True,
)
app.add_typer(fusion_app, name="fusion")


@fusion_app.command("analyze")
@reports_user_errors
def fusion_analyze(
    model_spec: Annotated[str, typer.Argument(metavar="MODEL", help="Model to analyse.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Directory for dependency.json/.png/.md.", file_okay=False)],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Calibration text: parent (the model's own answers), a calibration directory, a "
            "file or a cached hub id.",
        ),
    ] = "parent",
    sequences: Annotated[int, typer.Option("--sequences", help="Calibration windows to average over.")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 4,
    device: DeviceOption = None,
) -> None:
    """The block-dependency matrix M[i, j] (cosine distance of layer j's contribution without layer i), heatmap."""
    device = check_device(device)
    from open_nemotron.fusion.stage import AnalyzeConfig, analyze

    result = analyze(
        AnalyzeConfig(
            model=model_spec,
            out_dir=str(out),
            data=data,
            seq_len=seq_len,
            sequences=sequences,
            batch_size=batch_size,
            device=device,
        )
    )
    runs = ", ".join(f"{r[0]}-{r[-1]}" for r in result["attention_free_runs"]) or "none"
    typer.echo(
        f"{result['layers']} layers, {result['tokens']} tokens; attention-free runs: {runs}; "
        f"{out / 'dependency.png'}, {out / 'dependency.md'}"
    )


@fusion_app.command("fuse")
@reports_user_errors
def fusion_fuse(
    model_spec: Annotated[str, typer.Argument(metavar="MODEL", help="Model to fuse.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Directory for the fused model.", file_okay=False)],
    runs: Annotated[
        str | None, typer.Option("--runs", help="Layer runs FIRST-LAST[,...] (default: every attention-free run).")
    ] = None,
    max_width: Annotated[
        int | None, typer.Option("--max-width", help="Largest fused FFN width (longer runs are split).")
    ] = None,
    exclude_last: Annotated[
        bool,
        typer.Option("--exclude-last/--include-last", help="Leave each run's last FFN unfused (the paper's choice)."),
    ] = False,
    device: DeviceOption = None,
) -> None:
    """Fuse runs of consecutive attention-free layers into one wider SwiGLU each (exact: X + sum_k FFN_k(norm_k(X)))."""
    device = check_device(device)
    from open_nemotron.fusion.stage import FuseConfig, fuse_stage, parse_runs

    summary = fuse_stage(
        FuseConfig(
            model=model_spec,
            out_dir=str(out),
            runs=parse_runs(runs) if runs else None,
            max_width=max_width,
            exclude_last=exclude_last,
            device=device,
        )
    )
    groups = ", ".join(f"{g['layers'][0]}-{g['layers'][-1]} (width {g['width']})" for g in summary["groups"])
    typer.echo(f"fused {groups}: {summary['layers_before']} -> {summary['layers_after']} layers; model in {out}")


@app.command("export")
@reports_user_errors
def export(
    model_spec: Annotated[str, typer.Argument(metavar="MODEL", help="Model to export.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="Target engine: vllm (a checkpoint directory) or gguf (a file).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Directory (vllm) or .gguf file (gguf) to write.")],
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="vllm: bfloat16 (default), float16, float32; gguf: f16 (default), f32, q8_0."),
    ] = None,
    tokenizer_pre: Annotated[
        str | None,
        typer.Option(
            "--tokenizer-pre",
            help="gguf: llama.cpp's pre-tokenizer name for this vocabulary (known ones are found on their own).",
        ),
    ] = None,
) -> None:
    """Write MODEL for another engine, refusing (with the layers and the reason) what that engine cannot run."""
    from open_nemotron.export.gguf import export_gguf
    from open_nemotron.export.vllm import export_vllm

    if to == "vllm":
        if tokenizer_pre is not None:
            raise CliInputError("--tokenizer-pre applies to --to gguf only")
        with _stderr_console().status(f"exporting {model_spec} for vLLM ..."):
            written = export_vllm(model_spec, out, dtype=dtype or "bfloat16")
        typer.echo(f"wrote {written}; serve it with: vllm serve {written}")
    elif to == "gguf":
        with _stderr_console().status(f"exporting {model_spec} to GGUF ..."):
            written = export_gguf(model_spec, out, dtype=dtype or "f16", tokenizer_pre=tokenizer_pre)
        typer.echo(f"wrote {written}; serve it with llama.cpp: llama-server -m {written} --jinja")
    else:
        raise CliInputError(f"--to {to!r}: expected vllm or gguf")


rl_app = typer.Typer(
    help="RL data: prompt sets (verifiable tasks and synthetic instruction prompts, reasoning on and off) and the "
    "pass-rate filter the curriculum reads (docs/rl.md).",
    no_args_is_help=True,
)
app.add_typer(rl_app, name="rl")


@rl_app.command("prompts")
@reports_user_errors
def rl_prompts(
    out: Annotated[Path, typer.Option("--out", help="RL prompt file to write (.jsonl).", dir_okay=False)],
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated reasoning tasks ('' for none).")] = (
        "chain_sum,basic_arithmetic,simple_equations,leg_counting,gcd"
    ),
    per_task: Annotated[int, typer.Option("--per-task", help="Training items per task.")] = 64,
    difficulty: Annotated[str, typer.Option("--difficulty", help="easy, medium or hard.")] = "easy",
    instructions: Annotated[int, typer.Option("--instructions", help="Synthetic instruction prompts to add.")] = 0,
    min_instructions: Annotated[int, typer.Option("--min-instructions", help="Fewest instructions per prompt.")] = 1,
    max_instructions: Annotated[int, typer.Option("--max-instructions", help="Most instructions per prompt.")] = 10,
    exclude_suite: Annotated[
        list[Path] | None,
        typer.Option("--exclude-suite", help="An IFEval-format eval file no prompt may come from (repeatable)."),
    ] = None,
    on_fraction: Annotated[float, typer.Option("--on-fraction", help="Share of prompts with reasoning on.")] = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="Seed: task seeds start here; instruction draws.")] = 0,
) -> None:
    """Write an RL prompt set: training-seed task items (decontaminated against the held-out suite) and synthetic
    IFEval-style prompts, each with the reasoning switch in its system message."""
    from open_nemotron.train.rl_data import instruction_rows, save_rows, task_rows

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    rows, dropped = (
        task_rows(names, per_task, seed=seed, difficulty=difficulty, on_fraction=on_fraction) if names else ([], 0)
    )
    if instructions:
        rows += instruction_rows(
            instructions,
            seed=seed,
            on_fraction=on_fraction,
            min_instructions=min_instructions,
            max_instructions=max_instructions,
            exclude_suites=[str(p) for p in exclude_suite or []],
        )
    if not rows:
        raise CliInputError("rl prompts: no tasks and no instructions: expected --tasks or --instructions")
    save_rows(out, rows)
    on = sum(r["thinking"] for r in rows)
    typer.echo(
        f"wrote {len(rows)} prompts ({on} reasoning on, {len(rows) - on} off; {dropped} task items dropped "
        f"for overlapping the held-out suite) to {out}"
    )


@rl_app.command("pass-rate")
@reports_user_errors
def rl_pass_rate(
    model: Annotated[str, typer.Argument(help="Model whose pass rates to measure.")],
    prompts: Annotated[Path, typer.Option("--prompts", help="RL prompt file (rl prompts).", dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="Directory for pass_rates.jsonl, kept.jsonl, report.")],
    samples: Annotated[int, typer.Option("--samples", help="Samples per prompt.")] = 8,
    threshold: Annotated[float, typer.Option("--threshold", help="Drop prompts with pass rate >= this.")] = 0.75,
    drop_unsolved: Annotated[bool, typer.Option("--drop-unsolved", help="Also drop never-solved prompts.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Token budget per sample.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling top-p.")] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Engine slots decoding together.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    device: DeviceOption = None,
) -> None:
    """K samples per prompt, pass rate per prompt, and the set without the easy (and optionally unsolved) ones."""
    device = check_device(device)
    from open_nemotron.train.pass_rate import PassRateConfig, run

    result = run(
        PassRateConfig(
            model=model,
            prompts=str(prompts),
            output_dir=str(out),
            samples=samples,
            threshold=threshold,
            drop_unsolved=drop_unsolved,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            batch_size=batch_size,
            seed=seed,
            device=device,
        )
    )
    typer.echo(
        f"{result['prompts']} prompts, mean pass rate {result['mean_pass_rate']:.3f}; kept {result['kept']} in "
        f"{out / 'kept.jsonl'}; report {out / 'pass_rate.md'}"
    )


def _rl_command(algorithm: str, **options: Any) -> None:
    from open_nemotron.train.rl import RLConfig, run

    result = run(RLConfig(algorithm=algorithm, **options))
    typer.echo(
        f"{algorithm}: {result['steps']} steps in {result['train_seconds']:.0f} s; model {result['final_model']}; "
        f"report {Path(options['output_dir']) / 'rl_report.md'}"
    )


RLModelArg = Annotated[str, typer.Argument(help="Policy to train (e.g. the SFT model).")]
RLPromptsOption = Annotated[Path, typer.Option("--prompts", help="RL prompt file (kept.jsonl for the curriculum).")]
RLOutOption = Annotated[Path, typer.Option("--out", help="Run directory (checkpoints, final/, report).")]
RewardsOption = Annotated[str, typer.Option("--rewards", help="name=weight: accuracy, format, instructions, judge.")]
GenerationsOption = Annotated[int, typer.Option("--num-generations", help="Samples per prompt (a group).")]
PromptsPerStepOption = Annotated[int, typer.Option("--prompts-per-step", help="Prompts per optimiser step.")]
StepsOption = Annotated[int, typer.Option("--max-steps", help="Optimiser steps.")]
LrOption = Annotated[float, typer.Option("--lr", help="Learning rate.")]
BetaOption = Annotated[float, typer.Option("--beta", help="KL coefficient to the frozen reference (0: none).")]
MaxCompletionOption = Annotated[int, typer.Option("--max-completion-length", help="New tokens per sample.")]


@app.command()
@reports_user_errors
def grpo(
    model: RLModelArg,
    prompts: RLPromptsOption,
    out: RLOutOption,
    rewards: RewardsOption = "accuracy=1,format=1",
    random_order: Annotated[
        bool, typer.Option("--random-order", help="Random prompt order instead of the pass-rate curriculum.")
    ] = False,
    sigma: Annotated[float, typer.Option("--curriculum-sigma", help="Width of the curriculum's Gaussian.")] = 0.15,
    num_generations: GenerationsOption = 8,
    prompts_per_step: PromptsPerStepOption = 4,
    num_iterations: Annotated[int, typer.Option("--num-iterations", help="Updates per rollout.")] = 1,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling top-p.")] = 1.0,
    beta: BetaOption = 0.0,
    epsilon: Annotated[float, typer.Option("--epsilon", help="Clip range of the ratio.")] = 0.2,
    lr: LrOption = 1e-6,
    max_completion_length: MaxCompletionOption = 256,
    max_steps: StepsOption = 50,
    save_steps: Annotated[int, typer.Option("--save-steps", help="Checkpoint every N steps.")] = 10,
    use_vllm: Annotated[bool, typer.Option("--use-vllm", help="Colocated vLLM generation (GPU).")] = False,
    judge_url: Annotated[str | None, typer.Option("--judge-url", help="OpenAI-compatible judge endpoint.")] = None,
    judge_model: Annotated[str | None, typer.Option("--judge-model", help="Judge model name.")] = None,
    report_to: Annotated[str, typer.Option("--report-to", help="none, tensorboard, wandb, ...")] = "none",
    seed: Annotated[int, typer.Option("--seed", help="Seed.")] = 0,
    device: DeviceOption = None,
) -> None:
    """GRPO on TRL's GRPOTrainer with verifiable rewards and the pass-rate curriculum; resumes a killed run."""
    _rl_command(
        "grpo",
        model=model,
        prompts=str(prompts),
        output_dir=str(out),
        rewards=parse_reward_weights(rewards, option="--rewards"),
        curriculum=not random_order,
        curriculum_sigma=sigma,
        num_generations=num_generations,
        prompts_per_step=prompts_per_step,
        num_iterations=num_iterations,
        temperature=temperature,
        top_p=top_p,
        beta=beta,
        epsilon=epsilon,
        learning_rate=lr,
        max_completion_length=max_completion_length,
        max_steps=max_steps,
        save_steps=save_steps,
        use_vllm=use_vllm,
        judge_url=judge_url,
        judge_model=judge_model,
        report_to=report_to,
        seed=seed,
        device=check_device(device),
    )


@app.command()
@reports_user_errors
def rloo(
    model: RLModelArg,
    prompts: RLPromptsOption,
    out: RLOutOption,
    rewards: RewardsOption = "instructions=1,format=1",
    num_generations: GenerationsOption = 4,
    prompts_per_step: PromptsPerStepOption = 4,
    beta: BetaOption = 0.0,
    lr: LrOption = 1e-6,
    max_completion_length: MaxCompletionOption = 256,
    max_steps: StepsOption = 50,
    save_steps: Annotated[int, typer.Option("--save-steps", help="Checkpoint every N steps.")] = 10,
    report_to: Annotated[str, typer.Option("--report-to", help="none, tensorboard, wandb, ...")] = "none",
    seed: Annotated[int, typer.Option("--seed", help="Seed.")] = 0,
    device: DeviceOption = None,
) -> None:
    """RLOO on TRL's RLOOTrainer, by default for instruction following (IFEval reward on synthetic prompts)."""
    _rl_command(
        "rloo",
        model=model,
        prompts=str(prompts),
        output_dir=str(out),
        rewards=parse_reward_weights(rewards, option="--rewards"),
        curriculum=False,
        num_generations=num_generations,
        prompts_per_step=prompts_per_step,
        beta=beta,
        learning_rate=lr,
        max_completion_length=max_completion_length,
        max_steps=max_steps,
        save_steps=save_steps,
        report_to=report_to,
        seed=seed,
        device=check_device(device),
    )


@app.command()
@reports_user_errors
def rpo(
    model: RLModelArg,
    out: RLOutOption,
    pairs: Annotated[
        Path | None, typer.Option("--pairs", help="Offline: jsonl of prompt, chosen, rejected and their rewards.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="Online: RL prompt rows to sample and score pairs from.")
    ] = None,
    method: Annotated[str, typer.Option("--method", help="rpo (NVIDIA's) or dpo (TRL's, the comparison).")] = "rpo",
    variant: Annotated[str, typer.Option("--variant", help="RPO distance: bwd_kl, fwd_kl or sq.")] = "bwd_kl",
    beta: Annotated[float, typer.Option("--beta", help="KL strength.")] = 0.1,
    eta: Annotated[float, typer.Option("--eta", help="Reward scale.")] = 1.0,
    rewards: RewardsOption = "accuracy=1,format=1",
    samples: Annotated[int, typer.Option("--samples", help="Online: responses per prompt (best vs worst).")] = 4,
    lr: LrOption = 5e-7,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per step.")] = 4,
    max_steps: StepsOption = 50,
    save_steps: Annotated[int, typer.Option("--save-steps", help="Checkpoint every N steps.")] = 10,
    report_to: Annotated[str, typer.Option("--report-to", help="none, tensorboard, wandb, ...")] = "none",
    seed: Annotated[int, typer.Option("--seed", help="Seed.")] = 0,
    device: DeviceOption = None,
) -> None:
    """Reward-aware preference optimisation (offline pairs, or online pairs sampled and scored), or TRL's DPO."""
    from open_nemotron.train.rpo import PreferenceConfig, run

    result = run(
        PreferenceConfig(
            model=model,
            output_dir=str(out),
            pairs=str(pairs) if pairs else None,
            prompts=str(prompts) if prompts else None,
            method=method,
            variant=variant,
            beta=beta,
            eta=eta,
            rewards=parse_reward_weights(rewards, option="--rewards"),
            samples=samples,
            learning_rate=lr,
            batch_size=batch_size,
            max_steps=max_steps,
            save_steps=save_steps,
            report_to=report_to,
            seed=seed,
            device=check_device(device),
        )
    )
    typer.echo(f"{method}: {result['steps']} steps on {result['pairs']} pairs; model {result['final_model']}")


puzzle_app = typer.Typer(
    help="Puzzle NAS: block library by local distillation, measured costs, replace-1-block scores, MIP search, "
    "assembly. `puzzle run` runs every stage; each stage is also its own verb (artifacts: docs/puzzle.md).",
    no_args_is_help=True,
)
app.add_typer(puzzle_app, name="puzzle")

PuzzleConfigOption = Annotated[Path, typer.Option("--config", help="Puzzle YAML config (recipes/puzzle-demo.yaml).")]
RunDirOption = Annotated[Path, typer.Option("--run-dir", help="Run directory holding every stage's artifacts.")]
QuietOption = Annotated[bool, typer.Option("--quiet", help="No progress bars or step lines (stage summaries only).")]


def _puzzle_run(config_path: Path, run_dir: Path, quiet: bool = False):
    from open_nemotron.puzzle.config import load_config
    from open_nemotron.puzzle.pipeline import PuzzleRun

    return PuzzleRun(load_config(config_path), run_dir, progress=not quiet)


@puzzle_app.command("run")
@reports_user_errors
def puzzle_run(config: PuzzleConfigOption, run_dir: RunDirOption, quiet: QuietOption = False) -> None:
    """Every stage in order; stages already done with the same settings are skipped, long ones resume."""
    from open_nemotron.puzzle.config import load_config
    from open_nemotron.puzzle.pipeline import run

    report = run(load_config(config), run_dir, progress=not quiet, echo=typer.echo)
    for t in report["targets"]:
        if "layers" in t:
            measured = f"{t['measured_speedup']:.2f}x" if t.get("measured_speedup") else "-"
            typer.echo(
                f"{t['name']}: predicted {t['predicted_speedup']:.2f}x, measured {measured}, held-out KL "
                f"{t['heldout_kl']:.4f}, top-1 agreement {t['top1_agreement']:.3f} -> {t['child_dir']}"
            )
        else:
            typer.echo(f"{t['name']}: no solution ({t.get('error')})")
    typer.echo(f"report: {run_dir / 'report.md'}")


def _stage_command(stage: str, doc: str) -> None:
    def command(config: PuzzleConfigOption, run_dir: RunDirOption, quiet: QuietOption = False) -> None:
        from open_nemotron.puzzle.pipeline import run_stage

        seconds = run_stage(_puzzle_run(config, run_dir, quiet), stage, force=True)
        typer.echo(f"{stage}: {seconds:.1f} s; artifacts in {run_dir}")

    command.__doc__ = doc
    puzzle_app.command(stage)(reports_user_errors(command))


for _stage, _doc in (
    ("calibration", "Calibration tokens: train, selection and reporting sets (cached parent generations by default)."),
    ("build-library", "Decoupled BLD of every variant (resumable per layer and variant; shard with bld.shard)."),
    ("score", "Replace-1-block KL / LM-loss scores on the selection tokens (resumable per layer)."),
    ("costs", "Measure every variant's decode/prefill time, parameter and KV-cache bytes on this device."),
    ("search", "MIP search (scipy HiGHS) for every target, greedy baseline, and the speedup front."),
    ("assemble", "Build each chosen child, measure held-out KL, top-1 agreement and bench-speed vs the parent."),
    ("report", "report.json, report.md and front.png from the artifacts."),
):
    _stage_command(_stage, _doc)


def main() -> None:
    app()


@app.command("run")
@reports_user_errors
def run_recipe(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (recipes/demo.yaml).", show_default=False)],
    run_dir: RunDirOption,
    quiet: QuietOption = False,
) -> None:
    """One recipe from the parent to the report: convert, Puzzle, KD, fusion, SFT, GRPO, RLOO, eval, export
    (docs/pipeline.md). Steps already done with the same settings are skipped; long ones resume after a kill."""
    from open_nemotron.pipeline import load_recipe, run

    loaded, base = load_recipe(recipe)
    run(loaded, run_dir, base=base, progress=not quiet, echo=typer.echo)
    typer.echo(f"report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    main()
