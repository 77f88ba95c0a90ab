"""`open-nemotron puzzle`: the stages, their artifacts in the run directory, and `run` (all of them, resumable).

    calibration/     tokens.safetensors, calibration.json           (calibration)
    search_space.json                                                (every stage)
    library/         layer_XXX/<variant>.safetensors, library.json  (build-library)
    scores.json                                                      (score)
    costs.json                                                       (costs)
    search.json                                                      (search)
    children/<target>/  model + tokenizer; assemble.json             (assemble)
    report.json, report.md, front.png                                (report)
    stages.json      per stage: settings digest, seconds, finished

A stage is skipped when `stages.json` says it finished with the same settings digest (its config sections plus its
inputs' digests); otherwise it runs (the long ones resume inside: BLD per (layer, variant) and from its checkpoint,
scoring per layer). docs/puzzle.md documents every artifact.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from open_nemotron.errors import OpenNemotronError
from open_nemotron.puzzle.config import PuzzleConfig
from open_nemotron.puzzle.progress import step_printer
from open_nemotron.puzzle.search_space import SearchSpace, build_search_space
from open_nemotron.utils import atomic_write_text

# Costs run right before search and assembly: on a shared machine the speed of memory and cores drifts over minutes,
# and the prediction is only as good as the match between the machine state at `costs` and at `assemble`'s bench.
STAGES = ("calibration", "build-library", "score", "costs", "search", "assemble", "report")
# Which config sections (and upstream stages) each stage's output depends on.
STAGE_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "calibration": (("calibration",), ()),
    "build-library": (("search_space", "bld"), ("calibration",)),
    "costs": (("search_space", "costs", "device"), ()),
    "score": (("score",), ("build-library",)),
    "search": (("search",), ("costs", "score")),
    "assemble": (("assemble",), ("search",)),
    "report": ((), ("assemble",)),
}


class PuzzleRunError(OpenNemotronError, RuntimeError):
    """A stage whose inputs are missing or inconsistent."""


class PuzzleRun:
    """One run directory: the config, lazily loaded parent and artifacts, and the stage bookkeeping."""

    def __init__(self, config: PuzzleConfig, run_dir: str | Path, progress: bool = True, timer=None) -> None:
        self.config = config
        self.timer = timer  # costs' Timer (None: wall time); tests inject a fake one for deterministic costs
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self._parent = None
        self._tokenizer = None
        self._space: SearchSpace | None = None
        atomic_write_text(self.dir / "config.json", json.dumps(config.to_dict(), indent=1))

    # -- shared inputs
    @property
    def parent(self):
        if self._parent is None:
            import torch

            from open_nemotron.model.loading import default_device, load_model

            device = torch.device(self.config.device) if self.config.device else default_device()
            if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
                device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun process
            torch.manual_seed(self.config.seed)
            # Our class even for a plain Llama parent: Puzzle swaps its layers for heterogeneous ones.
            self._parent = load_model(self.config.parent, device=device, implementation="ours")
        return self._parent

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from open_nemotron.model.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.parent)
        return self._tokenizer

    @property
    def space(self) -> SearchSpace:
        if self._space is None:
            from open_nemotron.model.loading import load_deci_config

            self._space = build_search_space(load_deci_config(self.config.parent), self.config.search_space)
            atomic_write_text(self.dir / "search_space.json", json.dumps(self._space.to_dict(), indent=1))
        return self._space

    def read_json(self, name: str, stage: str) -> dict[str, Any]:
        path = self.dir / name
        if not path.is_file():
            raise PuzzleRunError(f"{path}: missing; run `open-nemotron puzzle {stage}` (or `puzzle run`) first")
        return json.loads(path.read_text())

    # -- stage bookkeeping
    def _stages(self) -> dict[str, Any]:
        path = self.dir / "stages.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def digest(self, stage: str) -> str:
        import hashlib

        sections, upstream = STAGE_INPUTS[stage]
        own = self.config.section_hash(*sections)
        state = self._stages()
        ups = [state.get(u, {}).get("digest", "") for u in upstream]
        return hashlib.sha256(json.dumps([own, ups]).encode()).hexdigest()[:16]

    def is_fresh(self, stage: str) -> bool:
        entry = self._stages().get(stage, {})
        return bool(entry.get("finished")) and entry.get("digest") == self.digest(stage)

    def run_stage(self, stage: str, fn: Callable[[], Any], force: bool = False) -> float:
        if not force and self.is_fresh(stage):
            return 0.0
        digest = self.digest(stage)
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        state = self._stages()
        state[stage] = {
            "digest": digest,
            "seconds": seconds,
            "finished": True,
            "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        atomic_write_text(self.dir / "stages.json", json.dumps(state, indent=1))
        return seconds

    def stage_seconds(self) -> dict[str, float]:
        return {s: round(v.get("seconds", 0.0), 2) for s, v in self._stages().items() if s in STAGES}

    # -- stages
    def calibration(self) -> dict[str, Any]:
        from open_nemotron.puzzle.calibration import build

        return build(
            self.config.parent,
            self.config.calibration,
            self.dir / "calibration",
            tokenizer=self.tokenizer,
            model=self.parent if self.config.calibration.source == "parent" else None,
            progress=self.progress,
        )

    def build_library(self) -> dict[str, Any]:
        from open_nemotron.puzzle.bld import build_library
        from open_nemotron.puzzle.calibration import load_tokens

        tokens = load_tokens(self.dir / "calibration")
        result = build_library(
            self.parent,
            self.space,
            tokens,
            self.config.bld,
            self.dir / "library",
            self.digest("calibration"),
            progress=self.progress,
        )
        missing = self.missing_library_entries()
        if missing:  # other shards still running: do not mark the stage finished
            raise PuzzleRunError(
                f"build-library: this shard finished; {len(missing)} entries of other shards are still missing "
                f"(e.g. {missing[0]}); rerun when every shard is done"
            )
        return result

    def missing_library_entries(self) -> list[str]:
        from open_nemotron.puzzle.bld import missing_entries, settings_digest

        digest = settings_digest(self.config.bld, self.digest("calibration"))
        return [f"layer {i} {v.name}" for i, v in missing_entries(self.space, self.dir / "library", digest)]

    def costs(self) -> dict[str, Any]:
        from open_nemotron.puzzle.costs import measure_costs

        result = measure_costs(self.parent, self.space, self.config.costs, progress=self.progress, timer=self.timer)
        atomic_write_text(self.dir / "costs.json", json.dumps(result, indent=1))
        return result

    def score(self) -> dict[str, Any]:
        from open_nemotron.puzzle.calibration import load_tokens
        from open_nemotron.puzzle.scoring import score_library

        missing = self.missing_library_entries()
        if missing:
            raise PuzzleRunError(
                f"score: the library lacks {len(missing)} entries (e.g. {missing[0]}); run build-library"
            )
        tokens = load_tokens(self.dir / "calibration")
        return score_library(
            self.parent,
            self.space,
            self.dir / "library",
            tokens["selection"],  # a decision (the MIP's scores): never the reporting set
            self.dir / "scores.json",
            batch_size=self.config.score.batch_size,
            metric=self.config.score.metric,
            progress=self.progress,
        )

    def search(self) -> dict[str, Any]:
        from open_nemotron.puzzle.search import run_search

        costs = self.read_json("costs.json", "costs")
        scores = self.read_json("scores.json", "score")
        scores["metric"] = self.config.score.metric
        result = run_search(self.space, costs, scores, self.config.search, self.config.costs)
        atomic_write_text(self.dir / "search.json", json.dumps(result, indent=1))
        return result

    def assemble(self) -> dict[str, Any]:
        from open_nemotron.evaluate.throughput import SpeedConfig
        from open_nemotron.evaluate.throughput import run as bench_speed
        from open_nemotron.model.loading import save_checkpoint
        from open_nemotron.puzzle.assemble import assemble_child, heldout_agreement
        from open_nemotron.puzzle.calibration import load_tokens
        from open_nemotron.puzzle.search_space import parse_variant

        say = step_printer(self.progress)
        search = self.read_json("search.json", "search")
        tokens = load_tokens(self.dir / "calibration")
        reporting = tokens["reporting"]  # seen by no decision
        children = []
        for target in search["targets"]:
            if target.get("solution") is None:
                continue
            layers = target["solution"]["layers"]
            attention = [parse_variant(layer["attention"]) for layer in layers]
            ffn = [parse_variant(layer["ffn"]) for layer in layers]
            say(f"assemble {target['name']}: building the child, then its agreement on the reporting set")
            child = assemble_child(self.parent, self.space, self.dir / "library", attention, ffn)
            out = self.dir / "children" / target["name"]
            quality = heldout_agreement(self.parent, child, reporting, self.config.score.batch_size)
            entry = {"name": target["name"], "dir": str(out), **quality}
            a = self.config.assemble
            if a.coupled_bld_epochs > 0:
                from open_nemotron.puzzle.coupled import coupled_bld

                say(f"assemble {target['name']}: coupled BLD ({a.coupled_bld_epochs:g} epochs)")
                entry["coupled_bld"] = coupled_bld(
                    self.parent,
                    child,
                    self.space,
                    tokens["train"],
                    tokens["selection"],
                    a.coupled_bld_epochs,
                    a.coupled_bld_learning_rate,
                    self.config.bld.batch_size,
                    self.config.bld.warmup_ratio,
                    self.config.seed,
                    self.progress,
                )
                entry["decoupled"] = quality
                entry.update(heldout_agreement(self.parent, child, reporting, self.config.score.batch_size))
            save_checkpoint(child, self.tokenizer, out)
            children.append(entry)
            del child
        if not children:
            raise PuzzleRunError("assemble: no target has a solution (see search.json)")
        from open_nemotron.model.loading import resolve_model_dir

        c, a = self.config.costs, self.config.assemble
        batch = search["batch_size"]
        say(f"assemble: bench-speed of the parent and {len(children)} children at batch {batch}")
        speed = bench_speed(
            SpeedConfig(
                models=[f"ours:{resolve_model_dir(self.config.parent)}", *[f"ours:{ch['dir']}" for ch in children]],
                batch_sizes=[batch],
                prompt_len=c.prompt_len,
                gen_len=c.gen_len,
                repeats=a.bench_repeats,
                memory=False,
                device=self.config.device,
                json_out=str(self.dir / "bench-speed.json"),
            ),
            progress=self.progress,
        )
        for ch, model in zip(children, speed["models"][1:], strict=True):
            ch["measured_speedup"] = model["ratio_to_first"][str(batch)]["decode"]
            ch["decode_tokens_per_s"] = model["batches"][str(batch)]["decode_tokens_per_s"]
        costs = self.read_json("costs.json", "costs")
        parent_step = speed["models"][0]["batches"][str(batch)]["decode_ms_per_step"] / 1e3
        costs_step = costs["fixed"].get("parent_decode_step_s", {}).get(str(batch))
        result = {
            "batch_size": batch,
            "parent_decode_tokens_per_s": speed["models"][0]["batches"][str(batch)]["decode_tokens_per_s"],
            # The parent's decode step here vs when costs were measured: far from 1, the machine changed state in
            # between and the predictions (made in the other state) are off by about as much.
            # None when costs.json has no positive parent step at this batch size (injected or hand-written costs).
            "machine_drift": parent_step / costs_step
            if isinstance(costs_step, (int, float)) and costs_step > 0
            else None,
            "children": children,
        }
        atomic_write_text(self.dir / "assemble.json", json.dumps(result, indent=1))
        return result

    def report(self) -> dict[str, Any]:
        from open_nemotron.puzzle.report import write_report

        return write_report(self)


STAGE_METHODS = {
    "calibration": "calibration",
    "build-library": "build_library",
    "costs": "costs",
    "score": "score",
    "search": "search",
    "assemble": "assemble",
    "report": "report",
}


def run_stage(run: PuzzleRun, stage: str, force: bool = True) -> float:
    if stage not in STAGE_METHODS:
        raise PuzzleRunError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    return run.run_stage(stage, getattr(run, STAGE_METHODS[stage]), force=force)


def run(
    config: PuzzleConfig,
    run_dir: str | Path,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    timer=None,
) -> dict:
    """Every stage in order, skipping the ones already done with the same settings; returns report.json.

    ``timer``: the costs stage's `Timer` (default: wall time); a test passes a fake one for deterministic costs.
    """
    pr = PuzzleRun(config, run_dir, progress=progress, timer=timer)
    say = step_printer(progress)
    for stage in STAGES:
        fresh = pr.is_fresh(stage)
        if not fresh:
            say(f"{stage}: running")
        seconds = run_stage(pr, stage, force=False)
        echo(f"{stage:>14}: {'up to date' if fresh else f'{seconds:7.1f} s'}")
    return json.loads((pr.dir / "report.json").read_text())
