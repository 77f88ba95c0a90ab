"""Puzzle stages on a tiny random Llama parent: search space, config validation, BLD (resume, shards), scores,
costs, assembly, and the whole `puzzle run` with its artifacts."""

from __future__ import annotations

import hashlib
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
from open_nemotron.puzzle.costs import CostsError, half_params, measure_costs
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
        "search_space": {"ffn_fractions": [0.5, 0.25], "ffn_multiple": 8, "non_portable_ffn_widths": True},
        "calibration": {
            "source": str(text),
            "seq_len": 16,
            "train_sequences": 12,
            "selection_sequences": 4,
            "reporting_sequences": 3,
        },
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
        parent.config,
        SearchSpaceConfig(vllm_compatible=True, ffn_fractions=[0.5], ffn_multiple=8, non_portable_ffn_widths=True),
    )
    assert [v.name for v in space.attention[0]] == ["attn:gqa_kv2"]  # layer 0 keeps its attention
    assert [v.name for v in space.attention[1]] == ["attn:gqa_kv2", "attn:no_op"]  # one KV-head count everywhere
    assert all(v.kind != "linear" for layer in space.attention + space.ffn for v in layer)
    assert vllm_servable(space.attention[1][:1] * 3, space.ffn[0][:1] * 3, 48) == [
        "FFN widths not multiples of 256 in layers 0, 1, 2: vLLM rebuilds them from ffn_mult and would build other widths"
    ]  # the tiny parent's FFN of 70
    no_attention_first = [space.attention[1][1]] + space.attention[1][:1] * 2
    assert any("no attention in layer 0" in p for p in vllm_servable(no_attention_first, space.ffn[0][:1] * 3, 48))
    assert any(
        "no attention layer at all" in p for p in vllm_servable([space.attention[1][1]] * 3, space.ffn[0][:1] * 3, 48)
    )


def test_ffn_width_rounds_to_the_multiple_and_stays_below_the_parent():
    assert ffn_width(1536, 0.75, 64) == 1152
    assert ffn_width(1536, 0.1, 64) == 128
    assert ffn_width(1536, 0.75, 256) == 1024  # 4.5 multiples: round half to even
    assert ffn_width(1536, 0.1, 256) == 256
    assert ffn_width(1536, 0.95, 256) is None  # rounds to the parent's own width: no option
    assert ffn_width(70, 0.01, 8) == 8
    assert ffn_width(70, 0.99, 8) is None


def test_bad_search_space_and_config_fields_are_named(parent_dir, text_file):
    with pytest.raises(PuzzleConfigError, match=r"bld\.learning_rat: unknown field"):
        config_from_dict(tiny_config_dict(parent_dir, text_file, bld={"learning_rat": 1.0}))
    with pytest.raises(PuzzleConfigError, match=r"costs\.repeats = 'x': expected an integer"):
        config_from_dict(tiny_config_dict(parent_dir, text_file, costs={"repeats": "x"}))
    with pytest.raises(PuzzleConfigError, match=r"search\.batch_sizes = \[4\]: \[4\] not in costs\.batch_sizes"):
        config_from_dict(tiny_config_dict(parent_dir, text_file, search={"batch_sizes": [4]}))
    with pytest.raises(PuzzleConfigError, match=r"calibration\.reporting_sequences = 0: expected a positive integer"):
        config_from_dict(tiny_config_dict(parent_dir, text_file, calibration={"reporting_sequences": 0}))
    with pytest.raises(
        PuzzleConfigError, match=r"calibration\.heldout_sequences: unknown field \(split into selection"
    ):
        config_from_dict(tiny_config_dict(parent_dir, text_file, calibration={"heldout_sequences": 4}))
    with pytest.raises(PuzzleConfigError, match=r"ffn_fractions"):
        config_from_dict(tiny_config_dict(parent_dir, text_file, search_space={"ffn_fractions": [1.5]}))
    with pytest.raises(SearchSpaceError, match="do not divide"):
        build_search_space(
            load_model(parent_dir, implementation="ours").config,
            SearchSpaceConfig(kv_heads=[4], non_portable_ffn_widths=True),
        )


# ------------------------------------------------------------------------------------------------ calibration


def test_calibration_sets_have_their_configured_sizes(tokens):
    assert tokens["train"].shape == (12, 16) and tokens["train"].dtype == torch.long
    assert tokens["selection"].shape == (4, 16) and tokens["reporting"].shape == (3, 16)


def test_calibration_train_selection_and_reporting_come_from_disjoint_documents(tmp_path, parent_dir):
    import re

    from open_nemotron.model.loading import load_tokenizer
    from open_nemotron.puzzle.calibration import CalibrationError, split_documents
    from open_nemotron.puzzle.config import CalibrationConfig

    documents = [f"<doc{i:03d}> " + "words of text " * (3 + i % 5) for i in range(40)]
    cfg = CalibrationConfig(
        source=str(tmp_path / "docs.txt"), seq_len=16, train_sequences=6, selection_sequences=3, reporting_sequences=3
    )
    parts = split_documents(documents, cfg)
    assert sorted(len(parts[k]) for k in ("selection", "reporting")) == [5, 5] and len(parts["train"]) == 30
    assert split_documents(documents, cfg) == parts  # seeded
    assert [len(v) for v in split_documents(["a", "b", "c"], cfg).values()] == [1, 1, 1]
    with pytest.raises(CalibrationError, match=r"2 document\(s\): expected at least 3"):
        split_documents(["a", "b"], cfg)
    assert sorted(parts["train"] + parts["selection"] + parts["reporting"]) == sorted(documents)  # a partition
    # Each set in shuffled, not source, order: windows are cut from a set's first documents, which must then be a
    # sample of the whole source rather than its beginning.
    for name in ("train", "selection", "reporting"):
        positions = [documents.index(d) for d in parts[name]]
        assert positions != sorted(positions)
    (tmp_path / "docs.txt").write_text("\n\n".join(documents))
    meta = build_calibration(str(parent_dir), cfg, tmp_path / "out")
    assert meta["documents"] == {"train": 30, "selection": 5, "reporting": 5}
    tokens = load_tokens(tmp_path / "out")
    tokenizer = load_tokenizer(str(parent_dir))
    seen = {}
    for name in ("train", "selection", "reporting"):
        text = "".join(tokenizer.decode(row) for row in tokens[name])
        seen[name] = set(re.findall(r"<doc\d{3}>", text))
        assert seen[name]  # every set holds documents...
        assert seen[name] <= {d.split()[0] for d in parts[name]}  # ...only its own
    assert not (seen["train"] & seen["selection"]) and not (seen["selection"] & seen["reporting"])
    assert not (seen["train"] & seen["reporting"])


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
        parent, space, library, tokens["selection"], tmp_path / "scores.json", batch_size=3, progress=False
    )
    layer, variant = 1, space.ffn[1][2]  # the narrower FFN in the middle layer
    child = assemble_child(
        parent,
        space,
        library,
        [a[0] for a in space.attention],
        [variant if i == layer else f[0] for i, f in enumerate(space.ffn)],
    )
    ids = tokens["selection"]
    with torch.no_grad():
        logp = F.log_softmax(parent(ids).logits[:, :-1], -1)
        logq = F.log_softmax(child(ids).logits[:, :-1], -1)
    reference = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    assert scores["layers"][layer]["ffn"][variant.name]["kl"] == pytest.approx(reference, rel=1e-4, abs=1e-7)
    assert scores["layers"][0]["attention"]["attn:no_op"]["kl"] > 0
    # No-op FFN in the last layer from the cached residual equals the agreement measured on the assembled child.
    again = score_library(
        parent, space, library, tokens["selection"], tmp_path / "scores.json", batch_size=3, progress=False
    )
    assert again == scores  # resumed: nothing left to score


def test_all_parent_choice_assembles_the_parent_exactly(parent, space, library, tokens):
    child = assemble_child(parent, space, library, [a[0] for a in space.attention], [f[0] for f in space.ffn])
    with torch.no_grad():
        assert torch.equal(child(tokens["reporting"]).logits, parent(tokens["reporting"]).logits)
    agreement = heldout_agreement(parent, child, tokens["reporting"])
    assert agreement["heldout_kl"] == pytest.approx(0.0, abs=1e-7) and agreement["top1_agreement"] == 1.0


def test_library_layer_loads_trained_halves(parent, space, library):
    layer = library_layer(parent, space, library, 2, space.attention[2][1], space.ffn[2][3])
    saved = load_file(str(bld_module.variant_path(library, 2, space.attention[2][1])))
    assert torch.equal(layer.self_attn.k_proj.weight, saved["self_attn.k_proj.weight"])
    assert layer.mlp.linear_mlp.weight.shape == (48, 48)


# ------------------------------------------------------------------------------------------------ costs


def params_timer(parent_config, probe_layers: int):
    """Fake costs: a probe's decode takes 1e-7 s per parameter of its variant (prefill 4x); the parent's generate
    of n tokens takes 30 ms + (n - 1) x 6 ms. Deterministic, so the search's choices are too."""

    def block_s(name, kind):
        return 1e-7 * half_params(parent_config, parse_variant(name)) * (1 if kind == "decode" else 4)

    return fake_timer(block_s, 6e-3, 30e-3, probe_layers)


def test_costs_cover_every_variant_with_exact_parameter_counts(parent, space, config):
    from open_nemotron.puzzle.bld import build_child_layer, half_state

    timer = params_timer(parent.config, config.costs.probe_layers)
    costs = measure_costs(parent, space, config.costs, progress=False, timer=timer)
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
        assert entry["decode_s"]["2"] == pytest.approx(1e-7 * entry["params"])
        assert entry["prefill_s"]["2"] == pytest.approx(4e-7 * entry["params"])
    assert costs["fixed"]["params"] == 2 * 259 * 48 + 48  # untied embeddings + LM head + final norm
    assert costs["fixed"]["parent_decode_step_s"]["2"] == pytest.approx(6e-3)
    assert costs["fixed"]["decode_s"]["2"] == pytest.approx(
        6e-3 - 1e-7 * (sum(p.numel() for p in parent.parameters()) - costs["fixed"]["params"])
    )
    assert costs["residual_warnings"] == []


def test_the_wall_timer_times_the_call_between_synchronisations():
    from open_nemotron.puzzle.costs import Timing, wall_timer

    calls = []
    seconds = wall_timer(Timing("decode", 1, "ffn:no_op"), lambda: calls.append(1), torch.device("cpu"))
    assert calls == [1] and seconds >= 0
    # The parent's generate measures its own spans inside its one call: the wall timer hands them on as they are.
    spans = wall_timer(Timing("generate", 1, new_tokens=8), lambda: (0.25, 0.5), torch.device("cpu"))
    assert spans == (0.25, 0.5)


def test_costs_refuse_a_parent_step_that_is_not_positive(parent, space, config):
    def timer(what, fn, device):
        fn()
        return (1e-3, 0.0) if what.kind == "generate" else 1e-4

    with pytest.raises(CostsError, match="decode step at batch size 2 is 0 s: expected a positive time"):
        measure_costs(parent, space, config.costs, progress=False, timer=timer)


# ------------------------------------------------------------------------------------------------ the whole run


def test_puzzle_run_writes_every_artifact_and_skips_finished_stages(tmp_path, parent_dir, text_file, monkeypatch):
    import itertools

    from transformers import AutoModelForCausalLM

    import open_nemotron.puzzle.assemble as assemble_module
    import open_nemotron.puzzle.scoring as scoring_module
    from open_nemotron.puzzle.config import TargetConfig
    from open_nemotron.puzzle.pipeline import STAGES, run

    config = config_from_dict(tiny_config_dict(parent_dir, text_file))
    config.search.targets = [TargetConfig(max_params=30000), TargetConfig(decode_speedup=1.5)]
    lines: list[str] = []
    parent_config = load_model(parent_dir, implementation="ours").config
    timer = params_timer(parent_config, config.costs.probe_layers)
    read: dict[str, list[torch.Tensor]] = {"init choice": [], "scores": [], "report": []}

    def spy(module, name, what, arg):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            read[what].append(args[arg].cpu())
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(bld_module, "evaluate_variants", "init choice", 2)  # the linear init vs BLD choice (and BLD's losses)
    spy(scoring_module, "score_library", "scores", 3)
    spy(assemble_module, "heldout_agreement", "report", 2)
    report = run(config, tmp_path / "run", progress=False, echo=lines.append, timer=timer)
    sets = load_tokens(tmp_path / "run" / "calibration")
    for what, name in (("init choice", "selection"), ("scores", "selection"), ("report", "reporting")):
        assert read[what] and all(torch.equal(t, sets[name]) for t in read[what]), what
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
    assert report["fixed_residual_s"] == pytest.approx(
        json.loads((tmp_path / "run" / "search.json").read_text())["fixed_residual_s"]
    )
    assert report["residual_warnings"] == [] and "Fixed residual" in (tmp_path / "run" / "report.md").read_text()
    from open_nemotron.puzzle.report import render_markdown

    negative = {**report, "fixed_residual_s": -2e-3, "residual_warnings": ["batch 2: the parent's probed ..."]}
    text = render_markdown(negative)
    assert "-2 ms — negative" in text and "- batch 2: the parent's probed ..." in text
    again: list[str] = []
    run(config, tmp_path / "run", progress=False, echo=again.append, timer=timer)
    assert all("up to date" in line for line in again)

    # The injected costs make the choices deterministic: brute force over every architecture of the space with
    # scores.json and the costs formula gives what each target must pick.
    space = build_search_space(parent_config, config.search_space)
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())

    def half_score(i, part, name):
        parent_name = space.variants(part)[i][0].name
        return 0.0 if name == parent_name else scores["layers"][i][part][name]["kl"]

    fixed = json.loads((tmp_path / "run" / "costs.json").read_text())["fixed"]
    fixed_params, fixed_s = fixed["params"], fixed["decode_s"]["2"]
    per_layer = []
    for i in range(3):
        options = []
        for a, f in itertools.product(space.attention[i], space.ffn[i]):
            params = half_params(parent_config, a) + half_params(parent_config, f)
            score = half_score(i, "attention", a.name) + half_score(i, "ffn", f.name)
            options.append((score, params, 1e-7 * params, a.name, f.name))
        per_layer.append(options)
    parent_step = fixed_s + sum(layer[0][2] for layer in per_layer)
    assert parent_step == pytest.approx(6e-3)  # fixed + the parent's blocks = the parent's (injected) step
    fits = {
        "max_params_30000": lambda params, step: fixed_params + params <= 30000,
        "decode_speedup_1.5": lambda params, step: parent_step / (fixed_s + step) >= 1.5 * (1 - 1e-9),
    }
    by_name = {t["name"]: t for t in report["targets"]}
    for name, fit in fits.items():
        best = min(
            (sum(c[0] for c in combo), [(c[3], c[4]) for c in combo])
            for combo in itertools.product(*per_layer)
            if fit(sum(c[1] for c in combo), sum(c[2] for c in combo))
        )
        chosen = [(la["attention"], la["ffn"]) for la in by_name[name]["layers"]]
        assert by_name[name]["summed_score"] == pytest.approx(best[0], abs=1e-9)
        assert chosen == best[1]


def test_parent_activations_match_the_model_hidden_states(parent, tokens):
    acts = parent_activations(parent, tokens["selection"])
    with torch.no_grad():
        hidden = parent(tokens["selection"], output_hidden_states=True).hidden_states
    for i in range(len(acts.inputs) - 1):
        assert torch.allclose(acts.inputs[i], hidden[i], atol=1e-6)


def test_parent_generated_calibration_is_cached_and_deterministic(tmp_path, parent_dir, monkeypatch):
    from open_nemotron.puzzle import calibration
    from open_nemotron.puzzle.config import CalibrationConfig

    monkeypatch.setattr(calibration, "_cache_dir", lambda: tmp_path / "cache")
    cfg = CalibrationConfig(
        source="parent",
        seq_len=8,
        train_sequences=4,
        selection_sequences=2,
        reporting_sequences=2,
        generate_prompts=6,
        generate_tokens=6,
    )
    first = build_calibration(str(parent_dir), cfg, tmp_path / "a")
    assert first["documents"] == {"train": 4, "selection": 1, "reporting": 1}
    cached = list((tmp_path / "cache").glob("*/documents.json"))
    assert len(cached) == 1
    docs = json.loads(cached[0].read_text())
    assert len(docs) == 6 and all("<|im_start|>assistant" in d for d in docs)
    monkeypatch.setattr(calibration, "parent_documents", lambda *a, **k: pytest.fail("regenerated despite the cache"))
    build_calibration(str(parent_dir), cfg, tmp_path / "b")
    assert torch.equal(load_tokens(tmp_path / "a")["train"], load_tokens(tmp_path / "b")["train"])


def test_parent_calibration_adds_free_text_documents_and_keeps_the_chat_only_cache_key(
    tmp_path, parent_dir, monkeypatch
):
    """generate_free_text: N more documents, each an opening of OPENINGS followed by the parent's plain-text
    continuation (no chat markup); with 0 the cache key is the one chat-only settings always had."""
    from open_nemotron.puzzle import calibration
    from open_nemotron.puzzle.config import CalibrationConfig

    monkeypatch.setattr(calibration, "_cache_dir", lambda: tmp_path / "cache")
    base = dict(
        source="parent",
        seq_len=8,
        train_sequences=4,
        selection_sequences=1,
        reporting_sequences=1,
        generate_prompts=3,
        generate_tokens=6,
    )
    chat_only, with_free = CalibrationConfig(**base), CalibrationConfig(**base, generate_free_text=3)
    key = calibration.cache_key(parent_dir, chat_only)
    assert key != calibration.cache_key(parent_dir, with_free)
    # The key as computed before the field existed (the same fields, hashed the same way).
    from open_nemotron.model.loading import weights_digest

    legacy = {
        "v": calibration.CALIBRATION_VERSION,
        "weights": weights_digest(parent_dir),
        "generate_prompts": 3,
        "generate_tokens": 6,
        "seed": 0,
    }
    assert key == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    meta = build_calibration(str(parent_dir), with_free, tmp_path / "a")
    assert sum(meta["documents"].values()) == 6
    (cached,) = (tmp_path / "cache").glob("*/documents.json")
    docs = json.loads(cached.read_text())
    assert all("<|im_start|>assistant" in d for d in docs[:3])
    for opening, doc in zip(calibration.OPENINGS, docs[3:], strict=False):
        assert doc.startswith(opening) and len(doc) > len(opening) and "<|im_start|>" not in doc


def test_jsonl_calibration_reads_text_and_chat_rows_and_names_bad_lines(tmp_path, parent_dir):
    from open_nemotron.puzzle.calibration import CalibrationError
    from open_nemotron.puzzle.config import CalibrationConfig

    rows = [{"text": f"document number {i} " * 5} for i in range(6)]
    rows += [{"input": [{"role": "user", "content": "hi there"}], "output": "hello, how can I help?"}]
    good = tmp_path / "c.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = CalibrationConfig(
        source=str(good), seq_len=8, train_sequences=3, selection_sequences=1, reporting_sequences=1
    )
    meta = build_calibration(str(parent_dir), cfg, tmp_path / "out")
    assert meta["documents"] == {"train": 5, "selection": 1, "reporting": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: not valid JSON"):
        build_calibration(str(parent_dir), CalibrationConfig(source=str(bad)), tmp_path / "out2")


def two_option_space(parent_config):
    """GQA 2 KV heads or none, FFN 70 / 32 / none per layer: small enough to enumerate."""
    return build_search_space(
        parent_config,
        SearchSpaceConfig(
            kv_heads=[2],
            attention_linear=False,
            ffn_fractions=[0.5],
            ffn_multiple=8,
            non_portable_ffn_widths=True,
            ffn_linear=False,
        ),
    )


def test_candidates_sum_their_halves_and_lm_loss_scores_are_relative_to_the_parent(parent, config):
    from open_nemotron.puzzle.search import build_candidates, fixed_costs, run_search

    space = two_option_space(parent.config)
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


# ------------------------------------------------------------------------------------------------ signed residuals


def fake_timer(block_s, parent_step_s: float, parent_prefill_s: float, probe_layers: int):
    """A deterministic timer: probe calls take probe_layers x block_s(variant, kind); the parent's generate of n
    tokens spans (prefill, (n - 1) steps). The timed functions still run (the code path is exercised)."""

    def timer(what, fn, device):
        out = fn()
        if what.kind == "generate":
            assert len(out) == 2 and out[0] > 0 and out[1] > 0  # the real spans, measured inside the call
            return parent_prefill_s, (what.new_tokens - 1) * parent_step_s
        return probe_layers * block_s(what.variant, what.kind)

    return timer


def test_costs_keep_a_negative_fixed_residual_signed_and_say_so(parent, space, config):
    def block_s(name, kind):
        return (2e-3 if "attn" in name else 3e-3) * (1 if kind == "decode" else 4)

    step, prefill = 1e-3, 50e-3  # the parent's step is shorter than its 3 x (2 + 3) ms of probed blocks
    timer = fake_timer(block_s, step, prefill, config.costs.probe_layers)
    costs = measure_costs(parent, space, config.costs, progress=False, timer=timer)
    fixed = costs["fixed"]
    assert fixed["parent_decode_step_s"]["2"] == pytest.approx(step)
    assert fixed["parent_blocks_decode_s"]["2"] == pytest.approx(3 * (2e-3 + 3e-3))
    assert fixed["decode_s"]["2"] == pytest.approx(step - 3 * 5e-3)  # -14 ms, not clamped to 0
    assert fixed["prefill_s"]["2"] == pytest.approx(prefill - 3 * 20e-3)  # -10 ms
    assert costs["variants"]["ffn:swiglu_32"]["decode_s"]["2"] == pytest.approx(3e-3)
    warnings = costs["residual_warnings"]
    assert len(warnings) == 2 and "decode step" in warnings[0] and "negative (-14 ms)" in warnings[0]
    # The parent's prediction (fixed + its blocks) equals its measured step.
    parent_blocks = sum(costs["variants"][space.attention[i][0].name]["decode_s"]["2"] for i in range(3)) + sum(
        costs["variants"][space.ffn[i][0].name]["decode_s"]["2"] for i in range(3)
    )
    assert fixed["decode_s"]["2"] + parent_blocks == pytest.approx(step)


def test_search_with_a_negative_residual_and_an_all_no_op_fastest_child(
    parent, config, tmp_path, parent_dir, text_file
):
    """The acceptance case: fixed < 0 and the fastest child (every half no-op) is predicted at fixed < 0 s."""
    import itertools

    from open_nemotron.puzzle.search import run_search

    space = two_option_space(parent.config)
    names = {v.name for layer in space.attention + space.ffn for v in layer}
    runtime = {"attn:gqa_kv2": 4e-3, "attn:no_op": 0.0, "ffn:swiglu_70": 5e-3, "ffn:swiglu_32": 3e-3, "ffn:no_op": 0.0}
    parent_step = 20e-3
    fixed_s = parent_step - 3 * (4e-3 + 5e-3)  # -7 ms
    costs = {
        "fixed": {"decode_s": {"2": fixed_s}, "params": 1000, "params_bytes": 4000},
        "residual_warnings": ["batch 2: ... negative ..."],
        "variants": {
            n: {
                "decode_s": {"2": runtime[n]},
                "params": 0 if "no_op" in n else 100,
                "params_bytes": 0 if "no_op" in n else 400,
                "kv_bytes_per_token": 64 if "kv" in n else 0,
            }
            for n in names
        },
    }
    kl = {"attn:no_op": 0.3, "ffn:swiglu_32": 0.05, "ffn:no_op": 0.2}
    layer_scores = {
        "attention": {"attn:no_op": {"kl": kl["attn:no_op"]}},
        "ffn": {n: {"kl": kl[n]} for n in ("ffn:swiglu_32", "ffn:no_op")},
    }
    scores = {"metric": "kl", "layers": [layer_scores] * space.num_layers}
    search = config.search.__class__(
        batch_sizes=[2], targets=[config.search.targets[0].__class__(decode_speedup=2.5)], front_points=4
    )
    result = run_search(space, costs, scores, search, config.costs)
    assert result["fixed_residual_s"] == pytest.approx(-7e-3) and result["residual_warnings"]
    assert result["parent"]["runtime_s"] == pytest.approx(parent_step)  # fixed + the parent's blocks
    # Brute force: the best summed KL among choices whose predicted step is positive and >= 2.5x the parent's speed.
    pairs = [(a.name, f.name) for a in space.attention[0] for f in space.ffn[0]]
    best = None
    for choice in itertools.product(pairs, repeat=3):
        step = fixed_s + sum(runtime[a] + runtime[f] for a, f in choice)
        score = sum(kl.get(a, 0.0) + kl.get(f, 0.0) for a, f in choice)
        if step > 0 and parent_step / step >= 2.5 and (best is None or score < best[0] - 1e-12):
            best = (score, step, choice)
    sol = result["targets"][0]["solution"]
    assert sol["score"] == pytest.approx(best[0])
    assert sol["runtime_s"] > 0 and sol["predicted_speedup"] == pytest.approx(parent_step / sol["runtime_s"])
    assert best[0] < 0.5 * 3  # the all no-op child (predicted at -7 ms) would not have been the best anyway...
    assert result["targets"][0]["greedy"].get("runtime_s", 1.0) > 0  # ...and nothing predicted <= 0 comes back

    # The same through `open-nemotron puzzle search` on a run directory: exit 0, the residual in search.json.
    import yaml
    from typer.testing import CliRunner

    from open_nemotron.cli import app

    space_config = {
        "kv_heads": [2],
        "attention_linear": False,
        "ffn_fractions": [0.5],
        "ffn_multiple": 8,
        "non_portable_ffn_widths": True,
        "ffn_linear": False,
    }
    data = tiny_config_dict(parent_dir, text_file, search_space=space_config)
    data["search"] = {"batch_sizes": [2], "targets": [{"decode_speedup": 2.5}], "front_points": 4}
    (tmp_path / "puzzle.yaml").write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "costs.json").write_text(json.dumps(costs))
    (run_dir / "scores.json").write_text(json.dumps(scores))
    args = ["puzzle", "search", "--config", str(tmp_path / "puzzle.yaml"), "--run-dir", str(run_dir), "--quiet"]
    cli = CliRunner().invoke(app, args)
    assert cli.exit_code == 0, cli.output
    written = json.loads((run_dir / "search.json").read_text())
    assert written["fixed_residual_s"] == pytest.approx(-7e-3) and written["residual_warnings"]
    assert written["targets"][0]["solution"]["score"] == pytest.approx(best[0])
    for point in result["front"]:
        assert point["predicted_speedup"] > 0 and (point["greedy_speedup"] is None or point["greedy_speedup"] > 0)


def test_a_degenerate_costs_json_is_a_one_line_cli_error(tmp_path, parent_dir, text_file, space):
    import yaml
    from typer.testing import CliRunner

    from open_nemotron.cli import app

    config_path = tmp_path / "puzzle.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config_dict(parent_dir, text_file)))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "scores.json").write_text(json.dumps({"metric": "kl", "layers": [{"attention": {}, "ffn": {}}] * 3}))
    result = CliRunner().invoke(app, ["puzzle", "search", "--config", str(config_path), "--run-dir", str(run_dir)])
    assert result.exit_code == 2 and result.output.startswith("error: ")  # no costs.json yet
    all_scores = {part: {v.name: {"kl": 0.1} for v in space.variants(part)[0]} for part in ("attention", "ffn")}
    (run_dir / "scores.json").write_text(json.dumps({"metric": "kl", "layers": [all_scores] * 3}))
    zero = {"decode_s": {"2": 0.0}, "params": 0, "params_bytes": 0, "kv_bytes_per_token": 0}
    all_zero = {v.name: zero for layer in space.attention + space.ffn for v in layer}
    for costs, message in (
        (
            {"fixed": {"decode_s": {"2": 0.0}, "params": 1, "params_bytes": 4}, "variants": all_zero},
            "the parent's predicted decode step at batch size 2 is 0 s",
        ),
        ({"fixed": {"decode_s": {"2": 0.01}, "params": 1, "params_bytes": 4}, "variants": {}}, "variants['attn:"),
        ({"fixed": {"decode_s": {}, "params": 1, "params_bytes": 4}, "variants": {}}, "fixed.decode_s['2'] = None"),
        ([], "(top level): expected a mapping"),
    ):
        (run_dir / "costs.json").write_text(json.dumps(costs))
        result = CliRunner().invoke(app, ["puzzle", "search", "--config", str(config_path), "--run-dir", str(run_dir)])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: costs.json") and message in result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_long_stages_print_step_lines_unless_quiet(tmp_path, parent, space, library, tokens, capsys):
    score_library(parent, space, library, tokens["selection"], tmp_path / "a.json", batch_size=3, progress=True)
    err = capsys.readouterr().err
    assert "scores: " in err and "selection sequences" in err
    score_library(parent, space, library, tokens["selection"], tmp_path / "b.json", batch_size=3, progress=False)
    assert capsys.readouterr().err == ""


def test_coupled_bld_trains_only_changed_layers_and_keeps_only_improvements(parent, space, library, tokens):
    """Layer 0 pruned FFN + fewer KV heads, layer 1 the parent's, layer 2 no-op attention: layers 0 and 2 train as
    whole blocks; the parent is untouched; a kept layer's selection loss went down, the others are restored."""
    import copy

    from open_nemotron.puzzle.coupled import coupled_bld, layers_to_couple

    attention = [
        space.attention[0][-2],
        space.attention[1][0],
        next(v for v in space.attention[2] if v.kind == "no_op"),
    ]
    ffn = [space.ffn[0][1], space.ffn[1][0], space.ffn[2][0]]
    child = assemble_child(parent, space, library, attention, ffn)
    assert layers_to_couple(child, space) == [0, 2]
    parent_before = copy.deepcopy(parent.state_dict())
    child_before = copy.deepcopy(child.state_dict())
    result = coupled_bld(parent, child, space, tokens["train"], tokens["selection"], 3.0, 3e-3, progress=False)
    assert result["layers"] == [0, 2] and result["steps"] == 9  # 12 windows / 4 per step x 3 epochs
    assert all(torch.equal(v, parent.state_dict()[k]) for k, v in parent_before.items())
    after = child.state_dict()
    for key, value in child_before.items():
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else None
        if layer in result["kept_trained"]:
            continue
        assert torch.equal(value, after[key]), key  # untrained or restored
    for i in result["layers"]:
        before_loss, after_loss = result["selection_loss_before"][str(i)], result["selection_loss_after"][str(i)]
        assert (i in result["kept_trained"]) == (after_loss < before_loss)
    assert result["kept_trained"], "three epochs at 3e-3 should improve at least one layer"
    # The layer loss the stage reports is the normalised MSE of that layer on the parent's activations.
    acts = parent_activations(parent, tokens["selection"])
    with torch.no_grad():
        y = parent.model.run_layers(
            acts.inputs[0], 0, 1, position_embeddings=acts.position_embeddings, replace={0: child.model.layers[0]}
        )
    direct = (y - acts.inputs[1]).pow(2).mean() / (acts.inputs[1] - acts.inputs[0]).pow(2).mean()
    expected = (
        result["selection_loss_after"]["0"] if 0 in result["kept_trained"] else result["selection_loss_before"]["0"]
    )
    assert direct.item() == pytest.approx(expected, rel=1e-4)
