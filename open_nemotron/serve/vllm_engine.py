"""`open-nemotron serve MODEL --engine vllm`: hand the same command to vLLM's own OpenAI-compatible server.

For users who outgrow one CPU: on a machine with a CUDA GPU and vLLM installed, the serve verb replaces its process
with `vllm serve` for the same checkpoint and options (so SIGTERM / SIGINT reach vLLM directly). Checked before
anything starts: vLLM importable, CUDA present, and a checkpoint vLLM can run: a Llama, or our format when
model/compatibility.py finds nothing vLLM lacks (vLLM reads our config class through the `vllm.general_plugins`
entry point, open_nemotron/serve/vllm_plugin.py). A child vLLM could not run is refused with the layers and the reason
rather than failing inside vLLM.

Reasoning: vLLM's parsers (`--reasoning-parser`, e.g. `qwen3`, `deepseek_r1`) look the think tags up as single
tokens of the vocabulary; SmolLM2's vocabulary spells `<think>` in several tokens, so with such a tokenizer leave
the parser unset (the think block then stays in `content`). Not checked on a GPU in this project yet.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from open_nemotron.errors import OpenNemotronError


class VLLMUnavailableError(OpenNemotronError, RuntimeError):
    """--engine vllm cannot start here (no vLLM, no CUDA, or a checkpoint vLLM cannot read), with the reason."""


def vllm_command(
    model_dir: str,
    host: str,
    port: int,
    max_batch_size: int,
    max_length: int,
    model_name: str,
    reasoning_parser: str | None = None,
) -> list[str]:
    """The `vllm serve` command line for these serve options."""
    executable = shutil.which("vllm")
    head = [executable, "serve"] if executable else [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    command = head + [
        model_dir,
        "--host",
        host,
        "--port",
        str(port),
        "--served-model-name",
        model_name,
        "--max-model-len",
        str(max_length),
        "--max-num-seqs",
        str(max_batch_size),
    ]
    if reasoning_parser:
        command += ["--reasoning-parser", reasoning_parser]
    return command


def check_vllm_can_serve(model_dir: str) -> None:
    import torch

    from open_nemotron.model.loading import read_config

    if importlib.util.find_spec("vllm") is None:
        raise VLLMUnavailableError("--engine vllm: vLLM is not installed here (pip install vllm, on a CUDA machine)")
    if not torch.cuda.is_available():
        raise VLLMUnavailableError("--engine vllm: no CUDA device here; vLLM serves on GPUs (use --engine ours)")
    model_type = read_config(Path(model_dir)).get("model_type")
    if model_type != "llama":
        from open_nemotron.export.vllm import vllm_export_problems

        problems = vllm_export_problems(model_dir)
        if problems:
            raise VLLMUnavailableError(
                f"--engine vllm: stock vLLM cannot serve {model_dir}: " + "; ".join(problems) + " (use --engine ours)"
            )


def exec_vllm(
    model_spec: str,
    host: str,
    port: int,
    max_batch_size: int,
    max_length: int,
    model_name: str | None,
    reasoning_parser: str | None = None,
) -> None:
    """Check, then replace this process with `vllm serve` (never returns)."""
    from open_nemotron.model.loading import resolve_model_dir

    model_dir = str(resolve_model_dir(model_spec))
    check_vllm_can_serve(model_dir)
    command = vllm_command(
        model_dir, host, port, max_batch_size, max_length, model_name or str(model_spec), reasoning_parser
    )
    print("exec:", " ".join(command), file=sys.stderr, flush=True)
    os.execvp(command[0], command)
