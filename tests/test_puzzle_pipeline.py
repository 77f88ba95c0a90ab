"""Puzzle stages on a tiny random Llama parent: search space, config validation, BLD (resume, shards), scores,
costs, assembly, and the whole `puzzle run` with its artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from models_for_tests import save_tiny_llama, tiny_llama_config
from safetensors.torch import load_file

import open_nemotron.puzzle.bld as bld_module
from open_nemotron.model.loading import load_model
from open_nemotron.puzzle.assemble import assemble_child, heldout_agreement
from open_nemotron.puzzle.bld import build_library, library_files, parent_activations
from open_nemotron.puzzle.calibration import build as build_calibration
from open_nemotron.puzzle.calibration import load_tokens
from open_nemotron.puzzle.config import PuzzleConfigError, config_from_dict
from open_nemotron.puzzle.costs import half_params, measure_costs
from open_nemotron.puzzle.scoring import library_layer, score_library
from open_nemotron.puzzle.search_space import (
    SearchSpaceConfig,
    SearchSpaceError,
    build_search_space,
    ffn_width,
    parse_variant,
    vllm_servable,
)

TEXT = "\n\n".join(
    f"Paragraph {i}: the {w} quick brown fox jumps over {i % 7} lazy dogs while counting to {i * 13}."
    for i, w in enumerate(["red", "blue", "green", "tiny", "huge", "odd", "even", "slow", "fast", "calm"] * 3)
)


def tiny_config_dict(parent: Path, text: Path, **overrides) -> dict:
    data = {
        "parent": str(parent),
        "device": "cpu",
        "search_space": {"ffn_fractions": [0.5, 0.25], "ffn_multiple": 8},
        "calibration": {"source": str(text), "seq_len": 16, "train_sequences": 12, "heldout_sequences": 4},
        "bld": {"batch_size": 4, "epochs": 1, "learning_rate": 0.001, "init_sequences": 8, "checkpoint_every": 2},
        "costs": {"batch_sizes": [2], "prompt_len": 8, "gen_len": 4, "probe_layers": 2, "repeats": 1},
        "score": {"batch_size": 2},
        # A parameter budget keeps the chosen architecture independent of timing noise.
        "search": {"batch_sizes": [2], "targets": [{"max_params": 30000}], "front_points": 3},
        "assemble": {"bench_repeats": 1},
    }
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return data


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("puzzle") / "parent"
    save_tiny_llama(path, tiny_llama_config(num_hidden_layers=3), seed=3)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def parent(parent_dir):
    return load_model(parent_dir, device="cpu", implementation="ours")


@pytest.fixture(scope="module")
def config(parent_dir, text_file):
    return config_from_dict(tiny_config_dict(parent_dir, text_file))


@pytest.fixture(scope="module")
def space(parent, config):
    return build_search_space(parent.config, config.search_space)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, parent_dir, config):
    out = tmp_path_factory.mktemp("calibration")
    build_calibration(str(parent_dir), config.calibration, out)
    return load_tokens(out)


@pytest.fixture(scope="module")
def library(tmp_path_factory, parent, space, tokens, config) -> Path:
    lib = tmp_path_factory.mktemp("library")
    build_library(parent, space, tokens, config.bld, lib, "calib", progress=False)
    return lib


# ------------------------------------------------------------------------------------------------ search space


def test_search_space_lists_parent_first_and_every_requested_variant(space):
    names = [v.name for v in space.attention[0]]
    assert names == ["attn:gqa_kv2", "attn:gqa_kv1", "attn:linear", "attn:no_op"]
    assert [v.name for v in space.ffn[0]] == [
        "ffn:swiglu_70",
        "ffn:swiglu_32",
        "ffn:swiglu_16",
        "ffn:linear",
        "ffn:no_op",
    ]
    for v in space.attention[0] + space.ffn[0]:
        assert parse_variant(v.name) == v


def test_vllm_compatible_space_has_only_what_vllm_serves(parent):
    space = build_search_space(
        parent.config, SearchSpaceConfig(vllm_compatible=True, ffn_fractions=[0.5], ffn_multiple=8)
    )
    assert [v.name for v in space.attention[0]] == ["attn:gqa_kv2"]  # layer 0 keeps its attention
    assert [v.name for v in space.attention[1]] == ["attn:gqa_kv2", "attn:no_op"]  # one KV-head count everywhere
    assert all(v.kind != "linear" for layer in space.attention + space.ffn for v in layer)
    assert vllm_servable(space.attention[1][:1] * 3, space.ffn[0][:1] * 3) == []
    assert vllm_servable([space.attention[1][1]] * 3, space.ffn[0][:1] * 3)  # no attention in layer 0


def test_ffn_width_rounds_to_the_multiple_and_stays_below_the_parent():
    assert ffn_width(1536, 0.75, 64) == 1152
    assert ffn_width(1536, 0.1, 64) == 128
    assert ffn_width(70, 0.01, 8) == 8
    assert ffn_width(70, 0.99, 8) == 69


def test_bad_search_space_and_config_fields_are_named(parent_dir, text_file):
    with pytest.raises(PuzzleConfigError, match=r"bld\.learning_rat: unknown field"):
        config_from_dict(tiny_config_dict(parent_dir, text_file, bld={"learning_rat": 1.0}))
    with pytest.raises(PuzzleConfigError, match=r"costs\.repeats = 'x': expected an integer"):
        config_from_dict(tiny_config_dict(parent_dir, text_file, costs={"repeats": "x"}))
    with pytest.raises(PuzzleConfigError, match=r"search\.batch_sizes = \[4\]: \[4\] not in costs\.batch_sizes"):
        config_from_dict(tiny_config_dict(parent_dir, text_file, search={"batch_sizes": [4]}))
    with pytest.raises(PuzzleConfigError, match=r"ffn_fractions"):
        config_from_dict(tiny_config_dict(parent_dir, text_file, search_space={"ffn_fractions": [1.5]}))
    with pytest.raises(SearchSpaceError, match="do not divide"):
        build_search_space(load_model(parent_dir, implementation="ours").config, SearchSpaceConfig(kv_heads=[4]))


# ------------------------------------------------------------------------------------------------ calibration


def test_calibration_train_and_heldout_come_from_disjoint_documents(tokens):
    assert tokens["train"].shape == (12, 16) and tokens["heldout"].shape == (4, 16)
    assert tokens["train"].dtype == torch.long


# ------------------------------------------------------------------------------------------------ BLD


def test_bld_trains_every_variant_and_improves_on_the_inits(library, space):
    index = json.loads((library / "library.json").read_text())
    expected = {
        f"{i}:{v.name}"
        for i in range(space.num_layers)
        for part in ("attention", "ffn")
        for v in space.variants(part)[i][1:]
        if v.kind != "no_op"
    }
    assert set(index["entries"]) == expected
    entries = index["entries"].values()
    assert all(e["heldout_loss"] <= e["init_heldout_loss"] for e in entries)  # never worse than its init
    trained = [e for e in entries if not e["variant"].endswith("linear")]
    assert sum(e["heldout_loss"] < e["init_heldout_loss"] for e in trained) >= 0.8 * len(trained)


def test_bld_skips_finished_entries_and_retrains_only_a_missing_one(tmp_path, parent, space, tokens, config):
    lib = tmp_path / "lib"
    build_library(parent, space, tokens, config.bld, lib, "calib", progress=False)
    before = {p: p.read_bytes() for p in library_files(lib)}
    assert build_library(parent, space, tokens, config.bld, lib, "calib", progress=False)["trained"] == 0
    victim = sorted(before)[3]
    victim.unlink()
    assert build_library(parent, space, tokens, config.bld, lib, "calib", progress=False)["trained"] == 1
    after = {p: p.read_bytes() for p in library_files(lib)}
    assert {p for p in after if after[p] != before.get(p)} <= {victim}  # nothing else rewritten


def test_bld_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, parent, space, tokens, config, monkeypatch):
    bld = config.bld.__class__(**{**vars(config.bld), "epochs": 2.0, "checkpoint_every": 2})
    reference = tmp_path / "reference"
    build_library(parent, space, tokens, bld, reference, "calib", progress=False)

    killed = tmp_path / "killed"
    real_save = bld_module._save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # a kill right after the first checkpoint

    monkeypatch.setattr(bld_module, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_library(parent, space, tokens, bld, killed, "calib", progress=False)
    monkeypatch.setattr(bld_module, "_save_checkpoint", real_save)
    assert (killed / "_checkpoint" / "state.safetensors").is_file()
    build_library(parent, space, tokens, bld, killed, "calib", progress=False)
    assert not (killed / "_checkpoint").exists()
    for path in library_files(reference):
        a, b = load_file(str(path)), load_file(str(killed / path.relative_to(reference)))
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), path.name


def test_bld_shards_together_equal_one_process(tmp_path, parent, space, tokens, config, library):
    lib = tmp_path / "sharded"
    for shard in ("0/2", "1/2"):
        cfg = config.bld.__class__(**{**vars(config.bld), "shard": shard})
        build_library(parent, space, tokens, cfg, lib, "calib", progress=False)
    files = library_files(library)
    assert [p.relative_to(library) for p in files] == [p.relative_to(lib) for p in library_files(lib)]
    for path in files:
        a, b = load_file(str(path)), load_file(str(lib / path.relative_to(library)))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), path.name


# ------------------------------------------------------------------------------------------------ scores, assembly


def test_replace_one_block_kl_equals_the_whole_model_with_that_block_swapped(tmp_path, parent, space, library, tokens):
    scores = score_library(
        parent, space, library, tokens["heldout"], tmp_path / "scores.json", batch_size=3, progress=False
    )
    layer, variant = 1, space.ffn[1][2]  # the narrower FFN in the middle layer
    child = assemble_child(
        parent,
        space,
        library,
        [a[0] for a in space.attention],
        [variant if i == layer else f[0] for i, f in enumerate(space.ffn)],
    )
    ids = tokens["heldout"]
    with torch.no_grad():
        logp = F.log_softmax(parent(ids).logits[:, :-1], -1)
        logq = F.log_softmax(child(ids).logits[:, :-1], -1)
    reference = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    assert scores["layers"][layer]["ffn"][variant.name]["kl"] == pytest.approx(reference, rel=1e-4, abs=1e-7)
    assert scores["layers"][0]["attention"]["attn:no_op"]["kl"] > 0
    # No-op FFN in the last layer from the cached residual equals the agreement measured on the assembled child.
    again = score_library(
        parent, space, library, tokens["heldout"], tmp_path / "scores.json", batch_size=3, progress=False
    )
    assert again == scores  # resumed: nothing left to score


def test_all_parent_choice_assembles_the_parent_exactly(parent, space, library, tokens):
    child = assemble_child(parent, space, library, [a[0] for a in space.attention], [f[0] for f in space.ffn])
    with torch.no_grad():
        assert torch.equal(child(tokens["heldout"]).logits, parent(tokens["heldout"]).logits)
    agreement = heldout_agreement(parent, child, tokens["heldout"])
    assert agreement["heldout_kl"] == pytest.approx(0.0, abs=1e-7) and agreement["top1_agreement"] == 1.0


def test_library_layer_loads_trained_halves(parent, space, library):
    layer = library_layer(parent, space, library, 2, space.attention[2][1], space.ffn[2][3])
    saved = load_file(str(bld_module.variant_path(library, 2, space.attention[2][1])))
    assert torch.equal(layer.self_attn.k_proj.weight, saved["self_attn.k_proj.weight"])
    assert layer.mlp.linear_mlp.weight.shape == (48, 48)


# ------------------------------------------------------------------------------------------------ costs


def test_costs_cover_every_variant_with_exact_parameter_counts(parent, space, config):
    from open_nemotron.puzzle.bld import build_child_layer, half_state

    costs = measure_costs(parent, space, config.costs, progress=False)
    for name, entry in costs["variants"].items():
        v = parse_variant(name)
        if v.kind == "no_op":
            assert entry["params"] == 0 and entry["decode_s"]["2"] == 0.0
            continue
        other = parse_variant("ffn:no_op" if v.part == "attention" else "attn:no_op")
        layer = build_child_layer(parent, 0, v if v.part == "attention" else other, v if v.part == "ffn" else other)
        assert (
            entry["params"]
            == sum(t.numel() for t in half_state(layer, v.part).values())
            == half_params(parent.config, v)
        )
        assert entry["decode_s"]["2"] > 0 and entry["prefill_s"]["2"] > 0
    assert costs["fixed"]["params"] == 2 * 259 * 48 + 48  # untied embeddings + LM head + final norm
    assert costs["fixed"]["parent_decode_step_s"]["2"] > 0


# ------------------------------------------------------------------------------------------------ the whole run


def test_puzzle_run_writes_every_artifact_and_skips_finished_stages(tmp_path, parent_dir, text_file):
    from transformers import AutoModelForCausalLM

    from open_nemotron.puzzle.pipeline import STAGES, run

    config = config_from_dict(tiny_config_dict(parent_dir, text_file))
    lines: list[str] = []
    report = run(config, tmp_path / "run", progress=False, echo=lines.append)
    for key in ("target_speedup", "predicted_speedup", "measured_speedup", "heldout_kl", "top1_agreement", "layers"):
        assert key in report
    assert set(report["stage_seconds"]) == set(STAGES) - {"report"} or set(report["stage_seconds"]) == set(STAGES)
    assert len(report["layers"]) == 3
    target = report["targets"][0]
    assert target["params"] <= 30000
    assert (tmp_path / "run" / "front.png").stat().st_size > 1000
    assert "| layer | attention | FFN |" in (tmp_path / "run" / "report.md").read_text()
    child = AutoModelForCausalLM.from_pretrained(target["child_dir"])  # plain transformers, registered class
    assert child.config.model_type == "nemotron-nas"
    blocks = child.config.layers_blocks()
    assert [(b.attention.kind, b.ffn.kind) for b in blocks] == [
        (parse_variant(la["attention"]).kind, parse_variant(la["ffn"]).kind) for la in report["layers"]
    ]
    again: list[str] = []
    run(config, tmp_path / "run", progress=False, echo=again.append)
    assert all("up to date" in line for line in again)


def test_parent_activations_match_the_model_hidden_states(parent, tokens):
    acts = parent_activations(parent, tokens["heldout"])
    with torch.no_grad():
        hidden = parent(tokens["heldout"], output_hidden_states=True).hidden_states
    for i in range(len(acts.inputs) - 1):
        assert torch.allclose(acts.inputs[i], hidden[i], atol=1e-6)


def test_parent_generated_calibration_is_cached_and_deterministic(tmp_path, parent_dir, monkeypatch):
    from open_nemotron.puzzle import calibration
    from open_nemotron.puzzle.config import CalibrationConfig

    monkeypatch.setattr(calibration, "_cache_dir", lambda: tmp_path / "cache")
    cfg = CalibrationConfig(
        source="parent", seq_len=8, train_sequences=4, heldout_sequences=2, generate_prompts=6, generate_tokens=6
    )
    first = build_calibration(str(parent_dir), cfg, tmp_path / "a")
    assert first["documents"] == {"train": 5, "heldout": 1}
    cached = list((tmp_path / "cache").glob("*/documents.json"))
    assert len(cached) == 1
    docs = json.loads(cached[0].read_text())
    assert len(docs) == 6 and all("<|im_start|>assistant" in d for d in docs)
    monkeypatch.setattr(calibration, "parent_documents", lambda *a, **k: pytest.fail("regenerated despite the cache"))
    build_calibration(str(parent_dir), cfg, tmp_path / "b")
    assert torch.equal(load_tokens(tmp_path / "a")["train"], load_tokens(tmp_path / "b")["train"])


def test_jsonl_calibration_reads_text_and_chat_rows_and_names_bad_lines(tmp_path, parent_dir):
    from open_nemotron.puzzle.calibration import CalibrationError
    from open_nemotron.puzzle.config import CalibrationConfig

    rows = [{"text": f"document number {i} " * 5} for i in range(6)]
    rows += [{"input": [{"role": "user", "content": "hi there"}], "output": "hello, how can I help?"}]
    good = tmp_path / "c.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = CalibrationConfig(source=str(good), seq_len=8, train_sequences=3, heldout_sequences=1)
    meta = build_calibration(str(parent_dir), cfg, tmp_path / "out")
    assert meta["documents"]["train"] + meta["documents"]["heldout"] == 7
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: not valid JSON"):
        build_calibration(str(parent_dir), CalibrationConfig(source=str(bad)), tmp_path / "out2")


def test_candidates_sum_their_halves_and_lm_loss_scores_are_relative_to_the_parent(parent, config):
    from open_nemotron.puzzle.search import build_candidates, fixed_costs, run_search

    space = build_search_space(
        parent.config,
        SearchSpaceConfig(kv_heads=[2], attention_linear=False, ffn_fractions=[0.5], ffn_multiple=8, ffn_linear=False),
    )
    names = {v.name for layer in space.attention + space.ffn for v in layer}
    costs = {
        "fixed": {"decode_s": {"2": 0.01}, "params": 1000, "params_bytes": 4000},
        "variants": {
            n: {
                "decode_s": {"2": 0.0 if "no_op" in n else 0.002 * (2 if "70" in n or "kv" in n else 1)},
                "params": 0 if "no_op" in n else 100,
                "params_bytes": 0 if "no_op" in n else 400,
                "kv_bytes_per_token": 64 if "kv" in n else 0,
            }
            for n in names
        },
    }
    layer_scores = {
        "attention": {"attn:no_op": {"kl": 0.5, "lm_loss": 3.5, "top1": 0.5}},
        "ffn": {
            "ffn:swiglu_32": {"kl": 0.1, "lm_loss": 3.1, "top1": 0.9},
            "ffn:no_op": {"kl": 0.7, "lm_loss": 3.9, "top1": 0.4},
        },
    }
    scores = {"metric": "lm_loss", "parent_lm_loss": 3.0, "layers": [layer_scores] * space.num_layers}
    layers = build_candidates(space, costs, scores)
    pair = {(c.attention, c.ffn): c for c in layers[1]}
    c = pair[("attn:no_op", "ffn:swiglu_32")]
    assert c.score == pytest.approx(0.5 + 0.1) and c.runtime_s[2] == pytest.approx(0.002)
    assert c.params == 100 and c.kv_bytes_per_token == 0
    assert pair[("attn:gqa_kv2", "ffn:swiglu_70")].score == 0.0
    assert fixed_costs(costs).runtime_s == {2: 0.01}
    search = config.search.__class__(
        batch_sizes=[2], targets=[config.search.targets[0].__class__(decode_speedup=1.5)], front_points=3
    )
    result = run_search(space, costs, scores, search, config.costs)
    sol = result["targets"][0]["solution"]
    assert sol["predicted_speedup"] >= 1.5
    assert result["parent"]["runtime_s"] == pytest.approx(0.01 + 3 * 0.008)
