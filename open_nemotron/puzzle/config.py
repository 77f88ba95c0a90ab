"""The `puzzle` configuration: one YAML file, one section per stage (recipes/puzzle-demo.yaml is the example).

Loading validates every field: an unknown key, a wrong type or an out-of-range value is a `PuzzleConfigError`
naming the field path (``bld.learning_rate``), the value and what was expected. docs/puzzle.md lists the fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from open_nemotron.errors import OpenNemotronError
from open_nemotron.puzzle.search_space import SearchSpaceConfig, SearchSpaceError


class PuzzleConfigError(OpenNemotronError, ValueError):
    """A puzzle configuration that cannot be used as written."""


@dataclass
class CalibrationConfig:
    # "parent": text the parent generates from a fixed prompt set (+ reasoning-task prompts), cached; or a local
    # .jsonl/.parquet/.txt file, or a hub dataset id (only when online or cached).
    source: str = "parent"
    text_field: str = "text"
    split: str = "train"
    seq_len: int = 128
    train_sequences: int = 192  # BLD training and the pruning / linear-fit inits
    selection_sequences: int = 8  # held out from BLD: linear init vs BLD choice, the replace-1-block scores
    reporting_sequences: int = 8  # held out from every decision: the report's held-out KL and top-1 agreement
    generate_prompts: int = 64  # parent source: prompts to answer (fixed list first, then reasoning tasks)
    generate_tokens: int = 128  # parent source: new tokens per answer
    # parent source: documents the parent writes on from a one-line opening, no chat template (its pretraining-like
    # text, broader than its chat answers); 0 = chat answers only
    generate_free_text: int = 0
    seed: int = 0


@dataclass
class BLDConfig:
    batch_size: int = 4  # sequences per step; one parent forward per step feeds every variant of every layer
    epochs: float = 1.0
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    init_sequences: int = 32  # calibration sequences for channel-contribution pruning and linear fits
    # Linear variants start from "fit" (least squares on calibration inputs -> the parent half's outputs) or the
    # paper's "product" (W_o·W_v, W_down·W_up). On SmolLM2-135M the products were worse than skipping the block
    # (normalised error 1.0-12.8), the fits 0.09-0.56 (puzzle/init.py).
    linear_init: str = "fit"
    checkpoint_every: int = 20  # steps; a killed run resumes from the last checkpoint
    shard: str | None = None  # "K/N": train layers i with i % N == K (default: from torch.distributed / 0/1)


@dataclass
class CostsConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [16])
    prompt_len: int = 64
    gen_len: int = 32
    probe_layers: int = 8  # copies of a sub-block timed together (weights stream from memory as in the model)
    repeats: int = 5


@dataclass
class ScoreConfig:
    metric: str = "kl"  # "kl" (KL(parent || child), the paper's choice) or "lm_loss"
    batch_size: int = 4


@dataclass
class TargetConfig:
    # Exactly one kind of target per entry; relative targets refer to the parent at the search batch size.
    decode_speedup: float | None = None
    min_throughput: float | None = None  # decoded tokens/s
    max_step_latency_ms: float | None = None
    max_memory_gib: float | None = None
    max_params: int | None = None
    # A modifier, not a kind: the child must have this many consecutive layers without attention (from layer 1 on,
    # each with a SwiGLU or no FFN), i.e. a run FFN Fusion can fuse; 0 = no such requirement.
    min_attention_free_run: int = 0

    @property
    def name(self) -> str:
        """``decode_speedup_1.5`` (``..._attnfree3`` with a run requirement): the child's directory name."""
        kind = next((f"{k}_{v:g}" for k, v in self.kinds().items() if v is not None), "target")
        return kind + (f"_attnfree{self.min_attention_free_run}" if self.min_attention_free_run else "")

    def kinds(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "min_attention_free_run"}


@dataclass
class SearchConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [16])
    seq_len: int | None = None  # KV-cache length for memory budgets (default: costs.prompt_len + costs.gen_len)
    targets: list[TargetConfig] = field(default_factory=lambda: [TargetConfig(decode_speedup=1.5)])
    n_solutions: int = 1
    alpha: float = 0.8
    front_points: int = 12  # extra MIP solves over a range of speedups for the plotted front
    time_limit_s: float = 60.0


@dataclass
class AssembleConfig:
    bench_repeats: int = 3  # bench-speed repeats for the measured speedup (parent and children interleaved)
    # Coupled BLD (the paper's second pass): epochs over the train tokens of whole-layer training for each chosen
    # child's non-parent layers, from the decoupled library weights; 0 = off (the child is the decoupled composition).
    coupled_bld_epochs: float = 0.0
    coupled_bld_learning_rate: float = 1e-4


@dataclass
class PuzzleConfig:
    parent: str = "smollm2-135m"
    device: str | None = None
    seed: int = 0
    search_space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    bld: BLDConfig = field(default_factory=BLDConfig)
    costs: CostsConfig = field(default_factory=CostsConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def section_hash(self, *sections: str) -> str:
        """A digest of the named sections (plus the parent): a stage reruns when its inputs change."""
        data = {"parent": self.parent, **{s: getattr(self, s) for s in sections}}
        text = json.dumps(json.loads(json.dumps(data, default=_jsonable)), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return asdict(obj)
    raise TypeError(type(obj).__name__)


# Fields that were split or renamed: the unknown-field error says what replaced them.
RENAMED = {
    "calibration.heldout_sequences": "split into selection_sequences (init choice, scores) and reporting_sequences "
    "(the report's held-out KL, seen by no decision)",
}

POSITIVE_INTS = {
    "calibration.seq_len",
    "calibration.train_sequences",
    "calibration.selection_sequences",
    "calibration.reporting_sequences",
    "calibration.generate_prompts",
    "calibration.generate_tokens",
    "bld.batch_size",
    "bld.init_sequences",
    "bld.checkpoint_every",
    "costs.prompt_len",
    "costs.probe_layers",
    "costs.repeats",
    "score.batch_size",
    "search.n_solutions",
    "assemble.bench_repeats",
}


def _check_value(path: str, value: Any, annotation: Any, error: type[Exception] = PuzzleConfigError) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(path, value, arg, error)
            except error as err:
                errors.append(str(err))
        raise error(errors[0] if len(errors) == 1 else f"{path} = {value!r}: expected {annotation}")
    if origin is list:
        if not isinstance(value, list):
            raise error(f"{path} = {value!r}: expected a list")
        return [_check_value(f"{path}[{i}]", v, args[0], error) for i, v in enumerate(value)]
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise error(f"{path} = {value!r}: expected a mapping")
        return dict(value)
    if annotation is typing.Any:
        return value
    if dataclasses.is_dataclass(annotation):
        return build_section(annotation, value, path, error)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{path} = {value!r}: expected a number")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{path} = {value!r}: expected an integer")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise error(f"{path} = {value!r}: expected true or false")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise error(f"{path} = {value!r}: expected a string")
        return value
    raise error(f"{path}: unsupported field type {annotation}")


def build_section(cls: type, data: Any, path: str, error: type[Exception] = PuzzleConfigError) -> Any:
    """`cls` (a dataclass) from the mapping `data`, every field checked against its type hint; errors (of type
    `error`) name the field path, the value and what was expected. Also used for the recipe (pipeline.py)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{path or 'config'} = {data!r}: expected a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        name = f"{path + '.' if path else ''}{unknown[0]}"
        hint = f" ({RENAMED[name]})" if name in RENAMED else ""
        raise error(f"{name}: unknown field{hint}; expected one of {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        kwargs[name] = _check_value(sub, value, hints[name], error)
        if sub in POSITIVE_INTS and kwargs[name] < 1:
            raise error(f"{sub} = {value!r}: expected a positive integer")
    try:
        return cls(**kwargs)
    except SearchSpaceError as err:
        raise error(str(err)) from None


def validate(config: PuzzleConfig) -> PuzzleConfig:
    """Range checks that span fields."""
    b, s, c = config.bld, config.search, config.costs
    if b.learning_rate <= 0:
        raise PuzzleConfigError(f"bld.learning_rate = {b.learning_rate}: expected a positive number")
    if b.epochs <= 0:
        raise PuzzleConfigError(f"bld.epochs = {b.epochs}: expected a positive number")
    if not 0 <= b.warmup_ratio < 1:
        raise PuzzleConfigError(f"bld.warmup_ratio = {b.warmup_ratio}: expected a number in [0, 1)")
    if b.shard is not None:
        parse_shard(b.shard)
    if b.linear_init not in ("fit", "product"):
        raise PuzzleConfigError(f"bld.linear_init = {b.linear_init!r}: expected 'fit' or 'product'")
    if config.calibration.generate_free_text < 0:
        raise PuzzleConfigError(
            f"calibration.generate_free_text = {config.calibration.generate_free_text}: expected an integer >= 0"
        )
    a = config.assemble
    if not a.coupled_bld_epochs >= 0:
        raise PuzzleConfigError(f"assemble.coupled_bld_epochs = {a.coupled_bld_epochs}: expected a number >= 0")
    if not a.coupled_bld_learning_rate > 0:
        raise PuzzleConfigError(
            f"assemble.coupled_bld_learning_rate = {a.coupled_bld_learning_rate}: expected a positive number"
        )
    if c.gen_len < 2:
        raise PuzzleConfigError(f"costs.gen_len = {c.gen_len}: expected at least 2")
    for name, sizes in (("costs.batch_sizes", c.batch_sizes), ("search.batch_sizes", s.batch_sizes)):
        if not sizes or any(x < 1 for x in sizes):
            raise PuzzleConfigError(f"{name} = {sizes}: expected a non-empty list of positive integers")
    missing = sorted(set(s.batch_sizes) - set(c.batch_sizes))
    if missing:
        raise PuzzleConfigError(
            f"search.batch_sizes = {s.batch_sizes}: {missing} not in costs.batch_sizes = {c.batch_sizes} "
            "(costs are measured only at those)"
        )
    if config.score.metric not in ("kl", "lm_loss"):
        raise PuzzleConfigError(f"score.metric = {config.score.metric!r}: expected 'kl' or 'lm_loss'")
    if not 0 <= s.alpha <= 1:
        raise PuzzleConfigError(f"search.alpha = {s.alpha}: expected a number in [0, 1]")
    if not s.targets:
        raise PuzzleConfigError("search.targets = []: expected at least one target")
    for i, t in enumerate(s.targets):
        given = [k for k, v in t.kinds().items() if v is not None]
        if not given:
            raise PuzzleConfigError(f"search.targets[{i}]: empty; expected one of {', '.join(t.kinds())}")
        if not isinstance(t.min_attention_free_run, int) or t.min_attention_free_run < 0:
            raise PuzzleConfigError(
                f"search.targets[{i}].min_attention_free_run = {t.min_attention_free_run!r}: expected an integer >= 0"
            )
        for k in given:
            if getattr(t, k) <= 0:
                raise PuzzleConfigError(f"search.targets[{i}].{k} = {getattr(t, k)}: expected a positive number")
    return config


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise PuzzleConfigError(f"bld.shard = {shard!r}: expected 'K/N' with 0 <= K < N") from None
    if not 0 <= k < n:
        raise PuzzleConfigError(f"bld.shard = {shard!r}: expected 'K/N' with 0 <= K < N")
    return k, n


def read_yaml(path: str | Path, error: type[Exception] = PuzzleConfigError, what: str = "config file") -> Any:
    """A YAML file's content (an empty file: {}); a missing file or bad YAML is an `error` naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


def load_config(path: str | Path) -> PuzzleConfig:
    return validate(build_section(PuzzleConfig, read_yaml(path), ""))


def config_from_dict(data: dict[str, Any]) -> PuzzleConfig:
    return validate(build_section(PuzzleConfig, data, ""))
