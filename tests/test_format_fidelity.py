"""Our config.json read the way every other nemotron-nas reader reads it (notes/decilm-format.md), compared with the
shapes our model actually has. The readers' formulas are re-derived here from their sources, not imported from us."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from models_for_tests import save_tiny_llama, tiny_llama_config

from open_nemotron.model.configuration import BlockConfigError, DeciLMConfig
from open_nemotron.model.loading import ModelLoadError, convert
from open_nemotron.model.modeling import DeciLMForCausalLM
from open_nemotron.puzzle.search_space import SearchSpaceConfig, SearchSpaceError


def _round_up_256(n: int) -> int:  # `_find_multiple(n, 256)` in vLLM, llama.cpp and NVIDIA's remote code
    return n if n % 256 == 0 else n + 256 - n % 256


def vllm_view(cfg: dict) -> list[tuple[int, int]]:
    """vLLM nemotron_nas.py with NVIDIA's 51B block dataclass: the width always comes from `ffn_mult`."""
    heads = cfg["num_attention_heads"]
    out = []
    for block in cfg["block_configs"]:
        attn, ffn = block["attention"], block["ffn"]
        kv = 0 if attn["no_op"] else heads // attn["n_heads_in_group"]
        width = 0 if ffn["no_op"] else _round_up_256(int(2 * ffn["ffn_mult"] * cfg["hidden_size"] / 3))
        out.append((kv, width))
    return out


def nvidia_51b_view(cfg: dict) -> tuple[list[int], float]:
    """NVIDIA's 51B/Super `FFNConfig` (ffn_mult rounded to 6 decimals) and `DeciLMConfig` (reads only the legacy
    top-level `rope_theta`, falling back to 10000)."""
    widths = [
        0 if b["ffn"]["no_op"] else _round_up_256(int(2 * round(b["ffn"]["ffn_mult"], 6) * cfg["hidden_size"] / 3))
        for b in cfg["block_configs"]
    ]
    return widths, cfg.get("rope_theta", 10000.0)


def puzzletron_view(cfg: dict) -> list[int]:
    """Model-Optimizer puzzletron: `intermediate_size` per block, asserted to be a multiple of 256."""
    widths = []
    for b in cfg["block_configs"]:
        size = 0 if b["ffn"]["no_op"] else b["ffn"]["intermediate_size"]
        assert size % 256 == 0, size
        widths.append(size)
    return widths


def llama_cpp_view(cfg: dict) -> tuple[list[int], list[int], list[int], float]:
    """llama.cpp's DECI converter: raw dict keys, per-layer head_count / head_count_kv / feed_forward_length, and
    `rope_theta` from the top-level hparams."""
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    n_head, n_kv, n_ff = [], [], []
    for b in cfg["block_configs"]:
        group = b["attention"]["n_heads_in_group"]
        if group is None:
            n_kv.append(0)
            n_head.append(heads if b["attention"]["replace_with_linear"] else 0)
        else:
            n_kv.append(heads // group)
            n_head.append(heads)
        mult = b["ffn"]["ffn_mult"]
        n_ff.append(0 if mult is None else _round_up_256(int(2 * mult * hidden / 3)))
    return n_head, n_kv, n_ff, cfg["rope_theta"]


def actual_shapes(model: DeciLMForCausalLM) -> tuple[list[int], list[int], list[int]]:
    """(query heads, KV heads, FFN width) per layer, read off the weights."""
    state = model.state_dict()
    head_dim = model.config.head_dim
    heads, kv, widths = [], [], []
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        q = state.get(p + "self_attn.q_proj.weight")
        k = state.get(p + "self_attn.k_proj.weight")
        heads.append(0 if q is None else q.shape[0] // head_dim)
        kv.append(0 if k is None else k.shape[0] // head_dim)
        gate = state.get(p + "mlp.gate_proj.weight")
        widths.append(0 if gate is None else gate.shape[0])
    return heads, kv, widths


def _rope_base(model: DeciLMForCausalLM) -> float:
    """The base our rotary embedding actually uses, recovered from its first inverse frequency after the zeroth."""
    inv_freq = model.model.rotary_emb.inv_freq.double()
    dim = model.config.head_dim
    return float(inv_freq[1] ** (-dim / 2))


PORTABLE_BLOCKS = [
    {"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 512}},
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 256}},
    {"attention": {"n_heads_in_group": 4}, "ffn": {"ffn_mult": 1.0}},  # NVIDIA-style entry: width from ffn_mult
    {"attention": {"n_heads_in_group": 1}, "ffn": {"no_op": True}},
]


@pytest.fixture(scope="module")
def saved_child(tmp_path_factory) -> tuple[dict, DeciLMForCausalLM]:
    cfg = tiny_llama_config(
        num_hidden_layers=len(PORTABLE_BLOCKS),
        intermediate_size=512,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=100000.0,
    )
    cfg = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    cfg.update(block_configs=PORTABLE_BLOCKS)
    torch.manual_seed(0)
    model = DeciLMForCausalLM(DeciLMConfig(**cfg)).eval()
    out = tmp_path_factory.mktemp("child")
    model.save_pretrained(out)
    return json.loads((out / "config.json").read_text()), DeciLMForCausalLM.from_pretrained(out).eval()


def test_every_reader_builds_the_shapes_our_model_has(saved_child):
    raw, model = saved_child
    heads, kv, widths = actual_shapes(model)
    assert widths == [512, 256, 256, 0]
    assert [w for _, w in vllm_view(raw)] == widths
    assert [k for k, _ in vllm_view(raw)] == kv
    assert nvidia_51b_view(raw)[0] == widths
    assert puzzletron_view(raw) == widths
    n_head, n_kv, n_ff, _ = llama_cpp_view(raw)
    assert (n_head, n_kv, n_ff) == (heads, kv, widths)


def test_rope_base_is_written_where_legacy_readers_look(saved_child):
    raw, model = saved_child
    assert math.isclose(_rope_base(model), 100000.0, rel_tol=1e-6)
    assert raw["rope_parameters"]["rope_theta"] == 100000.0
    assert nvidia_51b_view(raw)[1] == 100000.0  # not the silent 10000 fallback
    assert llama_cpp_view(raw)[3] == 100000.0
    assert "rope_scaling" not in raw  # default RoPE: nothing to scale


def test_llama3_rope_scaling_is_written_legacy_style_and_reads_back(tmp_path: Path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    cfg = DeciLMConfig(
        **{k: v for k, v in tiny_llama_config(intermediate_size=256).to_dict().items() if k != "model_type"}
        | {"rope_parameters": {"rope_theta": 500000.0, **scaling}}
    )
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_theta"] == 500000.0
    assert raw["rope_scaling"] == scaling  # the pre-transformers-5 layout NVIDIA's config and llama.cpp read
    assert DeciLMConfig.from_pretrained(tmp_path).rope_parameters == {"rope_theta": 500000.0, **scaling}


def test_a_width_other_readers_cannot_rebuild_is_refused_with_the_reason():
    base = {k: v for k, v in tiny_llama_config().to_dict().items() if k != "model_type"}
    base.update(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536)
    blocks = [{"attention": {"n_heads_in_group": 3}, "ffn": {"intermediate_size": w}} for w in (1536, 1152, 1536)]
    with pytest.raises(
        BlockConfigError, match=r"block_configs\[1\]\.ffn\.intermediate_size = 1152.*build 1280.*1024 or 1280"
    ):
        DeciLMConfig(**base, block_configs=blocks)
    allowed = DeciLMConfig(**base, block_configs=blocks, non_portable_ffn_widths=True)
    assert [b.ffn.intermediate_size for b in allowed.layers_blocks()] == [1536, 1152, 1536]
    assert allowed.to_dict()["non_portable_ffn_widths"] is True
    # ffn_mult and intermediate_size agree for every portable width
    for block in DeciLMConfig(**base, block_configs=blocks[:1] * 3).block_configs:
        assert _round_up_256(int(2 * block["ffn"]["ffn_mult"] * 576 / 3)) == block["ffn"]["intermediate_size"]


def test_convert_refuses_a_non_portable_parent_unless_asked(tmp_path: Path):
    parent = save_tiny_llama(tmp_path / "parent")  # FFN width 70
    with pytest.raises(ModelLoadError, match=r"intermediate_size = 70 is not a multiple of 256.*--non-portable"):
        convert(parent, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    out = convert(parent, tmp_path / "converted", non_portable_ffn_widths=True)
    assert json.loads((out / "config.json").read_text())["non_portable_ffn_widths"] is True


def test_search_space_widths_are_portable_by_default(tmp_path: Path):
    from open_nemotron.model.loading import load_deci_config
    from open_nemotron.puzzle.search_space import build_search_space

    parent = load_deci_config(save_tiny_llama(tmp_path / "parent"))  # FFN width 70: children would inherit it
    with pytest.raises(SearchSpaceError, match=r"FFN width\(s\) \[70\].*non_portable_ffn_widths: true"):
        build_search_space(parent, SearchSpaceConfig())
    space = build_search_space(parent, SearchSpaceConfig(ffn_multiple=8, non_portable_ffn_widths=True))
    assert "ffn:swiglu_32" in {v.name for v in space.ffn[0]}
    assert SearchSpaceConfig().ffn_multiple == 256
    with pytest.raises(SearchSpaceError, match=r"ffn_multiple = 64.*multiple of 256"):
        SearchSpaceConfig(ffn_multiple=64)
    assert SearchSpaceConfig(ffn_multiple=64, non_portable_ffn_widths=True).ffn_multiple == 64


def test_vllm_reads_block_configs_as_attributes_from_autoconfig(saved_child, tmp_path: Path):
    """vLLM builds the config with `AutoConfig` (our class, registered by its plugin) and reads each block by
    attribute: nemotron_nas.py's `block_config.ffn.ffn_mult` path and its convertor's first-attention KV count."""
    import copy
    import pickle

    from transformers import AutoConfig

    _, model = saved_child
    model.config.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)  # trust_remote_code off, as vLLM asks
    _, kv, widths = actual_shapes(model)
    seen = []
    for block in config.block_configs:
        if block.ffn.no_op:
            width = 0
        elif hasattr(block.ffn, "ffn_mult"):  # vLLM: the attribute exists -> the ffn_mult formula
            width = _round_up_256(int(2 * block.ffn.ffn_mult * config.hidden_size / 3))
        else:
            width = block.ffn.intermediate_size
        heads = 0 if block.attention.no_op else config.num_attention_heads // block.attention.n_heads_in_group
        seen.append((heads, width))
    assert seen == list(zip(kv, widths, strict=True))
    first = next(b for b in config.block_configs if not b.attention.no_op)
    assert config.num_attention_heads // first.attention.n_heads_in_group == kv[0]
    assert not hasattr(config.block_configs[0].ffn, "hidden_act")  # vLLM then uses the global silu
    # vLLM hashes the config through its JSON string and ships it to workers by pickle
    assert json.loads(config.to_json_string())["block_configs"] == json.loads(json.dumps(config.block_configs))
    assert pickle.loads(pickle.dumps(config.block_configs))[1].attention.no_op is True
    assert copy.deepcopy(config).block_configs[0].ffn.intermediate_size == 512


def test_the_vllm_plugin_entry_point_registers_our_config():
    from importlib.metadata import entry_points

    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "open_nemotron"]
    plugin.load()()  # what vLLM's load_general_plugins does in each process
    from transformers import AutoConfig

    assert type(AutoConfig.for_model("nemotron-nas")) is DeciLMConfig


def _views_match_shapes(raw: dict, model: DeciLMForCausalLM) -> None:
    """Every reader's per-layer view of `raw` (a config.json) equals the shapes `model` actually has."""
    heads, kv, widths = actual_shapes(model)
    assert [k for k, _ in vllm_view(raw)] == kv
    assert [w for _, w in vllm_view(raw)] == widths
    base = _rope_base(model)  # recovered from float32 frequencies: equal to ~1e-6
    nvidia_widths, nvidia_base = nvidia_51b_view(raw)
    assert nvidia_widths == widths and nvidia_base == pytest.approx(base, rel=1e-5)
    assert puzzletron_view(raw) == widths
    *llama_cpp_shapes, llama_cpp_base = llama_cpp_view(raw)
    assert tuple(llama_cpp_shapes) == (heads, kv, widths) and llama_cpp_base == pytest.approx(base, rel=1e-5)


@pytest.mark.slow
def test_readers_agree_with_the_default_parent_and_a_puzzle_child_of_it(tmp_path: Path):
    """The real default parent, and a child built from its default search space with every width and KV option
    (our config written as Puzzle's assembly writes it, shapes from a model built on the meta device)."""
    from open_nemotron.model.loading import load_deci_config, resolve_model_dir
    from open_nemotron.puzzle.search_space import build_search_space, child_block_configs, config_with_blocks

    converted = convert(resolve_model_dir("smollm2-135m"), tmp_path / "parent")
    raw = json.loads((converted / "config.json").read_text())
    parent = DeciLMForCausalLM.from_pretrained(converted).eval()
    _views_match_shapes(raw, parent)
    assert raw["rope_theta"] == 100000.0 and _rope_base(parent) == pytest.approx(100000.0, rel=1e-5)

    space = build_search_space(load_deci_config(converted), SearchSpaceConfig(attention_linear=False, ffn_linear=False))
    # Layer i takes the (i mod k)-th option of each list: every width and KV-head option occurs, no-ops included.
    attention = [options[i % len(options)] for i, options in enumerate(space.attention)]
    ffn = [options[(i // 2) % len(options)] for i, options in enumerate(space.ffn)]
    assert attention[0].block.kind != "no_op"  # what llama.cpp and vLLM need in layer 0
    child_config = config_with_blocks(parent.config, child_block_configs(parent.config, attention, ffn))
    child_config.save_pretrained(tmp_path / "child")
    child_raw = json.loads((tmp_path / "child" / "config.json").read_text())
    with torch.device("meta"):
        child = DeciLMForCausalLM(DeciLMConfig.from_pretrained(tmp_path / "child"))
    child.model.rotary_emb = type(child.model.rotary_emb)(config=child.config)  # real frequencies, on the CPU
    _views_match_shapes(child_raw, child)
    widths = set(actual_shapes(child)[2])
    assert {0, 256, 512, 768, 1024, 1536} <= widths, widths


def test_readers_agree_with_a_fused_child(tmp_path: Path):
    """A child whose attention-free runs FFN Fusion merged: fewer layers, wider FFNs, still read alike."""
    from open_nemotron.fusion import FusionPlan, fuse

    blocks = [
        {"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 512}},
        {"attention": {"no_op": True}, "ffn": {"intermediate_size": 256}},
        {"attention": {"no_op": True}, "ffn": {"intermediate_size": 768}},
        {"attention": {"no_op": True}, "ffn": {"no_op": True}},
        {"attention": {"n_heads_in_group": 4}, "ffn": {"intermediate_size": 256}},
        {"attention": {"no_op": True}, "ffn": {"intermediate_size": 512}},
        {"attention": {"no_op": True}, "ffn": {"intermediate_size": 512}},
    ]
    cfg = tiny_llama_config(
        num_hidden_layers=len(blocks), hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=5e5
    )
    cfg = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    torch.manual_seed(0)
    child = DeciLMForCausalLM(DeciLMConfig(**cfg, block_configs=blocks)).eval()
    fused = fuse(child, FusionPlan(((1, 2, 3), (5, 6))))
    fused.save_pretrained(tmp_path / "fused")
    raw = json.loads((tmp_path / "fused" / "config.json").read_text())
    loaded = DeciLMForCausalLM.from_pretrained(tmp_path / "fused").eval()
    assert raw["num_hidden_layers"] == 4 and actual_shapes(loaded)[2] == [512, 1024, 256, 1024]
    _views_match_shapes(raw, loaded)
