"""`open-nemotron export MODEL --to vllm DIR`: a checkpoint stock vLLM serves as `DeciLMForCausalLM`.

Our format already is what vLLM's nemotron-nas model reads (block_configs with `ffn_mult` and `n_heads_in_group`,
Llama weight names, nothing saved for no-op sub-blocks), so the export is a check plus a copy: it refuses, naming
the layers, what vLLM cannot run (model/compatibility.py), then writes config, safetensors, tokenizer and generation
config atomically, in the dtype asked for. vLLM has no config class for `nemotron-nas` and we ship no remote code;
our `vllm.general_plugins` entry point (open_nemotron/serve/vllm_plugin.py) registers ours in every vLLM process, so
`pip install open-nemotron vllm` then `vllm serve DIR` works without `--trust-remote-code`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from open_nemotron.errors import OpenNemotronError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(OpenNemotronError, ValueError):
    """A model that the target engine cannot run, or a bad export setting; the message says why."""


def vllm_export_problems(model_dir: str | os.PathLike) -> list[str]:
    """Why stock vLLM could not serve this checkpoint (empty when it can)."""
    from open_nemotron.model.compatibility import vllm_problems
    from open_nemotron.model.loading import load_deci_config

    config = load_deci_config(model_dir)
    return vllm_problems(config.layers_blocks(), config.hidden_size)


def export_vllm(model: str | os.PathLike, out: str | os.PathLike, dtype: str = "bfloat16") -> Path:
    """Write `model` (any spec we load) to `out` for vLLM; refuses with every reason when vLLM could not serve it."""
    from open_nemotron.model.loading import load_model, load_tokenizer, resolve_model_dir, save_checkpoint

    if dtype not in DTYPES:
        raise ExportError(f"export --dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    model_dir = resolve_model_dir(model)
    problems = vllm_export_problems(model_dir)
    if problems:
        raise ExportError(f"{model_dir}: stock vLLM cannot serve this model: " + "; ".join(problems))
    loaded = load_model(model_dir, dtype=DTYPES[dtype], device="cpu", implementation="ours")
    return save_checkpoint(loaded, load_tokenizer(model_dir), out)


__all__ = ["DTYPES", "ExportError", "export_vllm", "vllm_export_problems"]
