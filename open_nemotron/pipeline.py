"""`open-nemotron run RECIPE.yaml --run-dir DIR`: one recipe from a Llama parent to an efficient reasoning model,
its evaluation, its exports and a report.

Each stage calls the public `run` of its package and leaves its artifacts in DIR (docs/pipeline.md):

    parent/                    the converted parent                                  convert
    puzzle/                    Puzzle's run directory; the recipe's target child     puzzle
    distill/                   global KD of the child from the parent                distill
    fused/                     FFN Fusion of the child (optional)                    fusion
    data/                      the SFT data                                          datagen
    sft/<model>/               SFT of each model (child, parent)                     sft
    rl-prompts.jsonl           task prompts for GRPO                                 rl-prompts
    pass-rate/<model>/         pass rates of each SFT model; kept.jsonl              pass-rate
    grpo/<model>/              GRPO (pass-rate curriculum)                           grpo
    if-prompts.jsonl           synthetic instruction prompts for RLOO                if-prompts
    rloo/<model>/              RLOO for instruction following                        rloo
    eval/                      reasoning.json, if.json, mc.json, speed.json          eval
    export/                    child.gguf, child-vllm/ (or the refusal's reason)     export
    report.md, report.json     the story, with plots                                 report
    stages.json                per step: settings digest, seconds, finished

A step (a stage, or a stage for one model: `sft:child`) is skipped when `stages.json` says it finished with the same
settings digest (its recipe section plus the digests of the steps it reads); otherwise it runs, and the long ones
resume inside from their own checkpoints (Puzzle per library entry, KD / SFT / GRPO / RLOO from the last Trainer
checkpoint, pass rates per chunk). Every model and result is written atomically, so a kill at any moment leaves
either a finished artifact or none, and rerunning completes the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from open_nemotron.errors import OpenNemotronError
from open_nemotron.utils import atomic_write_text

MODELS = ("child", "parent")


class RecipeError(OpenNemotronError, ValueError):
    """A recipe that cannot be used as written: the field path, the value and what was expected."""


# ------------------------------------------------------------------------------------------------ the recipe
@dataclass
class RLPromptsSection:
    """GRPO's task prompts (`rl prompts`): training-seed items, decontaminated against the held-out suite."""

    tasks: list[str] = field(
        default_factory=lambda: ["chain_sum", "basic_arithmetic", "simple_equations", "leg_counting", "gcd"]
    )
    per_task: int = 40
    difficulty: str = "easy"
    on_fraction: float = 0.5


@dataclass
class IFPromptsSection:
    """RLOO's synthetic instruction prompts (`rl prompts --instructions`), never from an eval suite."""

    instructions: int = 200
    min_instructions: int = 1
    max_instructions: int = 3
    on_fraction: float = 0.0


@dataclass
class EvalSection:
    """What is measured: reasoning on/off (EvalConfig fields), instruction following on an IFEval-format suite,
    multiple-choice retention (eval-mc task files) and decode speed (SpeedConfig fields)."""

    reasoning: dict = field(default_factory=dict)
    if_suite: str | None = "recipes/if-heldout.jsonl"
    if_options: dict = field(default_factory=dict)
    mc_tasks: list[str] = field(default_factory=list)
    mc_limit: int | None = 200
    speed: dict = field(default_factory=lambda: {"batch_sizes": [1, 16]})


@dataclass
class ExportSection:
    gguf_dtype: str | None = "f16"  # null: no GGUF
    gguf_tokenizer_pre: str | None = None  # llama.cpp's pre-tokenizer name when the exporter does not know it
    vllm_dtype: str | None = "bfloat16"  # null: no vLLM checkpoint


@dataclass
class Recipe:
    """One YAML file (recipes/demo.yaml). A section set to null is skipped. Without `puzzle` there is no child, and
    the parent alone goes through SFT, RL and the evals (`models: [parent]`)."""

    parent: str = "smollm2-135m"
    seed: int = 0
    device: str | None = None
    non_portable_ffn_widths: bool = False
    # Trainer checkpoints (weights + optimiser state, ~3x the model each) only serve resuming a killed step: a
    # finished step's are removed unless kept (the demo's would take ~20 GB).
    keep_checkpoints: bool = False
    puzzle: str | None = None  # a Puzzle YAML, relative to the recipe (its `parent` is the converted parent)
    child: str | None = None  # the Puzzle target whose child goes on
    distill: dict | None = None  # DistillConfig fields (null: no KD)
    fusion: dict | None = None  # FuseConfig fields runs / max_width / exclude_last (null: no fusion)
    models: list[str] = field(default_factory=lambda: list(MODELS))
    datagen: dict | None = field(default_factory=dict)  # DatagenConfig fields (null: no SFT, no RL)
    sft: dict = field(default_factory=dict)  # SFTRunConfig fields
    rl_prompts: RLPromptsSection | None = field(default_factory=RLPromptsSection)  # null: no GRPO
    pass_rate: dict | None = field(default_factory=dict)  # PassRateConfig fields (null: all prompts, no curriculum)
    grpo: dict | None = field(default_factory=dict)  # RLConfig fields (null: no GRPO)
    if_prompts: IFPromptsSection | None = field(default_factory=IFPromptsSection)  # null: no RLOO
    rloo: dict | None = field(default_factory=dict)  # RLConfig fields (null: no RLOO)
    eval: EvalSection = field(default_factory=EvalSection)
    export: ExportSection = field(default_factory=ExportSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def stage_config(cls: type, section: dict, path: str, owned: dict[str, Any]) -> Any:
    """`cls` (a stage's config dataclass) from a recipe section plus the fields the recipe sets itself (`owned`),
    every field's type and the stage's own range checks applied; errors name the field path."""
    from open_nemotron.puzzle.config import build_section

    clash = sorted(set(section) & set(owned))
    if clash:
        raise RecipeError(f"{path}.{clash[0]}: set by the recipe itself; remove it from the recipe")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        expected = ", ".join(sorted(names - set(owned)))
        raise RecipeError(f"{path}.{unknown[0]}: unknown field; expected one of {expected}")
    try:
        return build_section(cls, {**section, **owned}, path, RecipeError)
    except RecipeError:
        raise
    except OpenNemotronError as err:  # the stage's own range checks (its __post_init__): "stage: field = ..."
        _, _, rest = str(err).partition(": ")
        field_name = rest.split(" ", 1)[0]
        raise RecipeError(f"{path}.{rest}" if field_name in names else f"{path}: {err}") from None


# The fields of each stage's config that the run sets itself (paths, models, the device): a recipe may not.
OWNED = {
    "distill": ("student", "teacher", "output_dir", "device"),
    "fusion": ("model", "out_dir", "device"),
    "datagen": ("out_dir",),
    "sft": ("model", "data", "output_dir", "device"),
    "pass_rate": ("model", "prompts", "output_dir", "device"),
    "grpo": ("model", "prompts", "output_dir", "algorithm", "device"),
    "rloo": ("model", "prompts", "output_dir", "algorithm", "device"),
    "eval.reasoning": ("models", "json_out", "device"),
    "eval.if_options": ("models", "suite", "json_out", "device"),
    "eval.speed": ("models", "json_out", "device"),
}


def stage_config_classes() -> dict[str, type]:
    """The config class each stage section of a recipe is built into (OWNED's keys)."""
    from open_nemotron.data.datagen import DatagenConfig
    from open_nemotron.distill.kd import DistillConfig
    from open_nemotron.evaluate.reasoning_eval import EvalConfig
    from open_nemotron.evaluate.throughput import SpeedConfig
    from open_nemotron.fusion.stage import FuseConfig
    from open_nemotron.train.pass_rate import PassRateConfig
    from open_nemotron.train.rl import RLConfig
    from open_nemotron.train.sft import SFTRunConfig

    return {
        "distill": DistillConfig,
        "fusion": FuseConfig,
        "datagen": DatagenConfig,
        "sft": SFTRunConfig,
        "pass_rate": PassRateConfig,
        "grpo": RLConfig,
        "rloo": RLConfig,
        "eval.reasoning": EvalConfig,
        "eval.if_options": EvalConfig,
        "eval.speed": SpeedConfig,
    }


def _placeholders(section: str) -> dict[str, Any]:
    """Stand-ins for OWNED[section], so a section is fully checked when the recipe is loaded."""
    values: dict[str, Any] = {"device": None, "models": ["<run>"], "algorithm": section}
    return {key: values.get(key, "<run>") for key in OWNED[section]}


def recipe_path(base: Path, relative: str) -> Path:
    """A path a recipe gives: relative to the recipe file, or as given (from the working directory) when only that
    exists."""
    candidate = base / relative
    return candidate if candidate.exists() or not Path(relative).exists() else Path(relative)


def _section(recipe: Recipe, key: str) -> dict | None:
    """The recipe section `key` ("sft", "eval.speed", ...)."""
    value: Any = recipe
    for part in key.split("."):
        value = getattr(value, part)
    return value


def load_recipe(path: str | Path) -> tuple[Recipe, Path]:
    """The recipe at `path`, every field checked (the stages' own configs included), and the directory relative
    paths in it are read from."""
    from open_nemotron.puzzle.config import read_yaml

    path = Path(path)
    return recipe_from_dict(read_yaml(path, RecipeError, "recipe file"), path.parent), path.parent


def recipe_from_dict(data: dict[str, Any], base: Path = Path(".")) -> Recipe:
    from open_nemotron.puzzle.config import build_section

    recipe = build_section(Recipe, data, "", RecipeError)
    check_recipe(recipe, base)
    return recipe


def check_recipe(recipe: Recipe, base: Path) -> None:
    """Cross-field checks, and every stage section built into its stage's config (types and ranges)."""
    from open_nemotron.export.gguf import GGUF_DTYPES

    bad = [m for m in recipe.models if m not in MODELS]
    if bad or not recipe.models or len(set(recipe.models)) != len(recipe.models):
        raise RecipeError(f"models = {recipe.models}: expected distinct names from {', '.join(MODELS)}")
    if recipe.puzzle is None:
        if "child" in recipe.models:
            raise RecipeError("models: 'child' needs a puzzle section (a Puzzle YAML); expected models: [parent]")
        for name in ("child", "distill", "fusion"):
            if getattr(recipe, name) is not None:
                raise RecipeError(f"{name}: needs a puzzle section (there is no child without Puzzle)")
    else:
        if not (base / recipe.puzzle).is_file():  # (an absolute path stays itself under `/`)
            raise RecipeError(f"puzzle = {recipe.puzzle!r}: no such Puzzle YAML (relative to the recipe)")
        if not recipe.child:
            raise RecipeError("child: missing; expected the name of a Puzzle target (search.targets[].name)")
        if recipe.distill is not None:
            _check_distill_text(recipe, base)
    for key, cls in stage_config_classes().items():  # every stage section, built into its stage's config
        section = _section(recipe, key)
        if section is not None and (key != "sft" or recipe.datagen is not None):  # no datagen: no SFT
            stage_config(cls, section, key, _placeholders(key))
    if recipe.datagen is None and (recipe.grpo is not None or recipe.rloo is not None):
        raise RecipeError("datagen: null skips SFT, and GRPO / RLOO start from the SFT models: set grpo and rloo null")
    if recipe.grpo is not None and recipe.rl_prompts is None:
        raise RecipeError("rl_prompts: null, but grpo is set: GRPO needs its task prompts")
    if recipe.rloo is not None and recipe.if_prompts is None:
        raise RecipeError("if_prompts: null, but rloo is set: RLOO needs its instruction prompts")
    if recipe.rl_prompts is not None and not recipe.rl_prompts.tasks:
        raise RecipeError("rl_prompts.tasks = []: expected at least one task")
    ip = recipe.if_prompts
    if ip is not None and not 1 <= ip.min_instructions <= ip.max_instructions:
        raise RecipeError(
            f"if_prompts: min_instructions = {ip.min_instructions}, max_instructions = {ip.max_instructions}: "
            "expected 1 <= min <= max"
        )
    ev = recipe.eval
    for i, task in enumerate(ev.mc_tasks):
        if not recipe_path(base, task).is_file():
            raise RecipeError(f"eval.mc_tasks[{i}] = {task!r}: no such task file (make mc-tasks writes them)")
    if ev.if_suite is not None and not recipe_path(base, ev.if_suite).is_file():
        raise RecipeError(f"eval.if_suite = {ev.if_suite!r}: no such IFEval-format file")
    ex = recipe.export
    if ex.gguf_dtype is not None and ex.gguf_dtype not in GGUF_DTYPES:
        raise RecipeError(f"export.gguf_dtype = {ex.gguf_dtype!r}: expected one of {', '.join(GGUF_DTYPES)} or null")
    if ex.vllm_dtype is not None and ex.vllm_dtype not in ("bfloat16", "float16", "float32"):
        raise RecipeError(f"export.vllm_dtype = {ex.vllm_dtype!r}: expected bfloat16, float16, float32 or null")


# ------------------------------------------------------------------------------------------------ the run
class RecipeRun:
    """One run directory: the recipe, the stage bookkeeping (`stages.json`) and where each artifact lives."""

    def __init__(
        self, recipe: Recipe, run_dir: str | Path, base: Path = Path("."), progress: bool = True, puzzle_timer=None
    ) -> None:
        self.recipe, self.base, self.progress = recipe, Path(base), progress
        self.puzzle_timer = puzzle_timer  # Puzzle's costs timer (None: wall time); tests pass a deterministic one
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "recipe.json", json.dumps(recipe.to_dict(), indent=1))

    def path(self, relative: str) -> Path:
        return recipe_path(self.base, relative)

    # -- bookkeeping
    def stages(self) -> dict[str, Any]:
        path = self.dir / "stages.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def digest(self, settings: Any, upstream: tuple[str, ...]) -> str:
        state = self.stages()
        ups = [state.get(u, {}).get("digest", "") for u in upstream]
        text = json.dumps([settings, ups], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _record(self, name: str, entry: dict[str, Any]) -> None:
        state = self.stages()
        state[name] = entry
        atomic_write_text(self.dir / "stages.json", json.dumps(state, indent=1))

    def step(self, step: Step) -> bool:
        """Run a step unless it finished with the same digest; returns whether it ran. A step that started under
        other settings first loses its outputs (its checkpoints would resume the old settings); one that started
        under these settings and was killed resumes from them."""
        import shutil

        digest = self.digest(step.settings, step.upstream)
        entry = self.stages().get(step.name, {})
        if entry.get("finished") and entry.get("digest") == digest:
            return False
        if entry and entry.get("digest") != digest:
            for path in step.outputs:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self._record(step.name, {"digest": digest, "finished": False, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        start = time.perf_counter()
        step.run()
        self._record(
            step.name,
            {
                "digest": digest,
                "seconds": round(time.perf_counter() - start, 2),
                "finished": True,
                "at": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
        if not self.recipe.keep_checkpoints:  # after "finished" is on disk: a kill here leaves only spare files
            for path in step.outputs:
                for checkpoint in path.glob("checkpoint-*"):  # nothing for a missing directory or a file
                    shutil.rmtree(checkpoint, ignore_errors=True)
        return True

    # -- where things are
    @property
    def parent_dir(self) -> Path:
        return self.dir / "parent"

    def child_dir(self) -> Path:
        """The child as it goes on: fused if fusion ran, else distilled, else Puzzle's."""
        r = self.recipe
        if r.fusion is not None:
            return self.dir / "fused"
        if r.distill is not None:
            return self.dir / "distill" / "final"
        return self.dir / "puzzle" / "children" / str(r.child)

    def base_model(self, name: str) -> Path:
        return self.child_dir() if name == "child" else self.parent_dir

    def sft_model(self, name: str) -> Path:
        return self.dir / "sft" / name / "final" if self.recipe.datagen is not None else self.base_model(name)

    def grpo_model(self, name: str) -> Path:
        return self.dir / "grpo" / name / "final" if self.recipe.grpo is not None else self.sft_model(name)

    def final_model(self, name: str) -> Path:
        return self.dir / "rloo" / name / "final" if self.recipe.rloo is not None else self.grpo_model(name)

    def model_upstream(self, name: str) -> str:
        """The step that last wrote `name`'s base model."""
        r = self.recipe
        if name == "parent":
            return "convert"
        return "fusion" if r.fusion is not None else "distill" if r.distill is not None else "puzzle"


# ------------------------------------------------------------------------------------------------ the stages
@dataclass
class Step:
    """One unit of bookkeeping. `settings` and the digests of the `upstream` steps make its digest; `run` writes its
    artifacts (atomically, resuming where its stage supports it); `outputs` are removed when it restarts under other
    settings."""

    name: str
    settings: Any
    upstream: tuple[str, ...]
    run: Callable[[], Any]
    outputs: tuple[Path, ...] = ()


def _with_seed(section: dict, recipe: Recipe) -> dict:
    return {"seed": recipe.seed, **section}


def distill_section(recipe: Recipe) -> dict:
    """KD's section with its seed: its own, else the recipe's + 1. KD's default data is text the parent writes,
    seeded as Puzzle's calibration text is; with Puzzle's seed the two would be the same documents, and KD's
    reporting KL would be measured on text Puzzle chose the child with."""
    return {"seed": recipe.seed + 1, **recipe.distill}


def _check_distill_text(recipe: Recipe, base: Path) -> None:
    """Refuse KD text that is Puzzle's calibration text (same source, same seed): held out means held out."""
    from open_nemotron.puzzle.config import read_yaml

    section = distill_section(recipe)
    calibration = read_yaml(recipe_path(base, recipe.puzzle), RecipeError, "Puzzle YAML").get("calibration") or {}
    same_text = section.get("data", "parent") == "parent" and calibration.get("source", "parent") == "parent"
    if same_text and section["seed"] == calibration.get("seed", 0):
        raise RecipeError(
            f"distill.seed = {section['seed']}: the seed of Puzzle's calibration text ({recipe.puzzle}: "
            "calibration.seed); KD's training and reporting text would be the documents Puzzle chose the child on: "
            "expected another seed"
        )


def convert_stage(rr: RecipeRun) -> list[Step]:
    r = rr.recipe

    def convert() -> None:
        import shutil

        from open_nemotron.model.loading import convert, resolve_model_dir

        if rr.parent_dir.exists():  # an older parent of other settings: this step's digest changed
            shutil.rmtree(rr.parent_dir)
        convert(resolve_model_dir(r.parent), rr.parent_dir, non_portable_ffn_widths=r.non_portable_ffn_widths)

    return [Step("convert", {"parent": r.parent, "non_portable": r.non_portable_ffn_widths}, (), convert)]


def puzzle_stage(rr: RecipeRun) -> list[Step]:
    r = rr.recipe
    if r.puzzle is None:
        return []
    from open_nemotron.puzzle.config import read_yaml

    settings = read_yaml(rr.path(r.puzzle), RecipeError, "Puzzle YAML")

    def puzzle() -> None:
        from open_nemotron.puzzle.config import config_from_dict
        from open_nemotron.puzzle.pipeline import run as run_puzzle

        device = {"device": r.device} if r.device is not None else {}  # else the Puzzle YAML's own
        config = config_from_dict({**settings, "parent": str(rr.parent_dir), **device})
        run_puzzle(config, rr.dir / "puzzle", progress=rr.progress, echo=lambda line: None, timer=rr.puzzle_timer)
        child = rr.dir / "puzzle" / "children" / str(r.child)
        if not (child / "config.json").is_file():
            made = sorted(p.name for p in (rr.dir / "puzzle" / "children").glob("*") if p.is_dir())
            raise RecipeError(f"child = {r.child!r}: Puzzle made no such child; it made {', '.join(made) or 'none'}")

    # Puzzle keeps its own per-stage digests (puzzle/stages.json): a changed section reruns only what it affects.
    return [Step("puzzle", {"puzzle": settings, "child": r.child, "device": r.device}, ("convert",), puzzle)]


def distill_stage(rr: RecipeRun) -> list[Step]:
    from open_nemotron.distill.kd import DistillConfig

    r = rr.recipe
    if r.distill is None:
        return []
    owned = {
        "student": str(rr.dir / "puzzle" / "children" / str(r.child)),
        "teacher": str(rr.parent_dir),
        "output_dir": str(rr.dir / "distill"),
        "device": r.device,
    }
    section = distill_section(r)

    def distill() -> None:
        from open_nemotron.distill.kd import run as run_distill

        run_distill(stage_config(DistillConfig, section, "distill", owned))

    return [Step("distill", section, ("puzzle",), distill, (rr.dir / "distill",))]


def fusion_stage(rr: RecipeRun) -> list[Step]:
    from open_nemotron.fusion.stage import FuseConfig

    r = rr.recipe
    if r.fusion is None:
        return []
    source = rr.dir / "distill" / "final" if r.distill is not None else rr.dir / "puzzle" / "children" / str(r.child)
    owned = {"model": str(source), "out_dir": str(rr.dir / "fused"), "device": r.device}

    def fuse() -> None:
        from open_nemotron.fusion.stage import fuse_stage

        fuse_stage(stage_config(FuseConfig, r.fusion, "fusion", owned))

    upstream = ("distill" if r.distill is not None else "puzzle",)
    return [Step("fusion", r.fusion, upstream, fuse, (rr.dir / "fused",))]


def datagen_stage(rr: RecipeRun) -> list[Step]:
    from open_nemotron.data.datagen import DatagenConfig

    r = rr.recipe
    if r.datagen is None:
        return []
    section = _with_seed(r.datagen, r)

    def datagen() -> None:
        from open_nemotron.data.datagen import run as run_datagen

        run_datagen(stage_config(DatagenConfig, section, "datagen", {"out_dir": str(rr.dir / "data")}), rr.progress)

    return [Step("datagen", section, (), datagen, (rr.dir / "data",))]


def sft_stage(rr: RecipeRun) -> list[Step]:
    from open_nemotron.train.sft import SFTRunConfig

    r = rr.recipe
    if r.datagen is None:
        return []
    section = _with_seed(r.sft, r)
    steps = []
    for name in r.models:
        owned = {
            "model": str(rr.base_model(name)),
            "data": str(rr.dir / "data" / "data.jsonl"),
            "output_dir": str(rr.dir / "sft" / name),
            "device": r.device,
        }

        def sft(owned=owned) -> None:
            from open_nemotron.train.sft import run as run_sft

            run_sft(stage_config(SFTRunConfig, section, "sft", owned))

        ups = (rr.model_upstream(name), "datagen")
        steps.append(Step(f"sft:{name}", section, ups, sft, (rr.dir / "sft" / name,)))
    return steps


def rl_prompts_stage(rr: RecipeRun) -> list[Step]:
    r = rr.recipe
    steps: list[Step] = []
    if r.grpo is not None and r.rl_prompts is not None:
        p = r.rl_prompts

        def task_prompts() -> None:
            from open_nemotron.train.rl_data import save_rows, task_rows

            rows, _ = task_rows(p.tasks, p.per_task, seed=r.seed, difficulty=p.difficulty, on_fraction=p.on_fraction)
            save_rows(rr.dir / "rl-prompts.jsonl", rows)

        steps.append(Step("rl-prompts", {**dataclasses.asdict(p), "seed": r.seed}, (), task_prompts))
    if r.rloo is not None and r.if_prompts is not None:
        q = r.if_prompts
        suites = [str(rr.path(r.eval.if_suite))] if r.eval.if_suite else []

        def instruction_prompts() -> None:
            from open_nemotron.train.rl_data import instruction_rows, save_rows

            rows = instruction_rows(
                q.instructions,
                seed=r.seed,
                on_fraction=q.on_fraction,
                min_instructions=q.min_instructions,
                max_instructions=q.max_instructions,
                exclude_suites=suites,  # never train on a file given to eval
            )
            save_rows(rr.dir / "if-prompts.jsonl", rows)

        settings = {**dataclasses.asdict(q), "seed": r.seed, "exclude": suites}
        steps.append(Step("if-prompts", settings, (), instruction_prompts))
    return steps


def pass_rate_stage(rr: RecipeRun) -> list[Step]:
    from open_nemotron.train.pass_rate import PassRateConfig

    r = rr.recipe
    if r.grpo is None or r.pass_rate is None:
        return []
    section = _with_seed(r.pass_rate, r)
    steps = []
    for name in r.models:
        owned = {
            "model": str(rr.sft_model(name)),
            "prompts": str(rr.dir / "rl-prompts.jsonl"),
            "output_dir": str(rr.dir / "pass-rate" / name),
            "device": r.device,
        }

        def pass_rate(owned=owned) -> None:
            from open_nemotron.train.pass_rate import run as run_pass_rate

            run_pass_rate(stage_config(PassRateConfig, section, "pass_rate", owned), rr.progress)

        ups = (f"sft:{name}", "rl-prompts")
        steps.append(Step(f"pass-rate:{name}", section, ups, pass_rate, (rr.dir / "pass-rate" / name,)))
    return steps


def _rl_steps(rr: RecipeRun, algorithm: str) -> list[Step]:
    from open_nemotron.train.rl import RLConfig

    r = rr.recipe
    section = getattr(r, algorithm)
    if section is None:
        return []
    section = _with_seed(section, r)
    if algorithm == "grpo" and r.pass_rate is None:
        section = {"curriculum": False, **section}  # no pass rates: random order
    steps = []
    for name in r.models:
        if algorithm == "grpo":
            start, up = rr.sft_model(name), f"sft:{name}"
            if r.pass_rate is not None:
                prompts, prompt_step = rr.dir / "pass-rate" / name / "kept.jsonl", f"pass-rate:{name}"
            else:
                prompts, prompt_step = rr.dir / "rl-prompts.jsonl", "rl-prompts"
        else:
            start = rr.grpo_model(name)
            up = f"grpo:{name}" if r.grpo is not None else f"sft:{name}"
            prompts, prompt_step = rr.dir / "if-prompts.jsonl", "if-prompts"
        owned = {
            "model": str(start),
            "prompts": str(prompts),
            "output_dir": str(rr.dir / algorithm / name),
            "algorithm": algorithm,
            "device": r.device,
        }

        def train(owned=owned) -> None:
            from open_nemotron.train.rl import run as run_rl

            run_rl(stage_config(RLConfig, section, algorithm, owned))

        outputs = (rr.dir / algorithm / name,)
        steps.append(Step(f"{algorithm}:{name}", section, (up, prompt_step), train, outputs))
    return steps


def grpo_stage(rr: RecipeRun) -> list[Step]:
    return _rl_steps(rr, "grpo")


def rloo_stage(rr: RecipeRun) -> list[Step]:
    return _rl_steps(rr, "rloo")


def evaluated_models(rr: RecipeRun) -> dict[str, str]:
    """label -> model directory for the reasoning and IF evals: each model after SFT and after RL."""
    out: dict[str, str] = {}
    for name in rr.recipe.models:
        out[f"{name} after SFT" if rr.recipe.datagen is not None else name] = str(rr.sft_model(name))
        final = rr.final_model(name)
        if final != rr.sft_model(name):
            out[f"{name} after RL"] = str(final)
    return out


def model_steps(rr: RecipeRun) -> tuple[str, ...]:
    """The steps that write the models `evaluated_models` lists."""
    r, ups = rr.recipe, []
    for name in r.models:
        ups.append(rr.model_upstream(name))
        for stage, on in (("sft", r.datagen), ("grpo", r.grpo), ("rloo", r.rloo)):
            if on is not None:
                ups.append(f"{stage}:{name}")
    return tuple(dict.fromkeys(ups))


def retention_models(rr: RecipeRun) -> dict[str, str]:
    """label -> model for multiple-choice retention and KL: the parent first, then the child at each healing step."""
    r = rr.recipe
    out = {"parent": str(rr.parent_dir)}
    if r.puzzle is not None:
        out["child (Puzzle)"] = str(rr.dir / "puzzle" / "children" / str(r.child))
        if r.distill is not None:
            out["child after KD"] = str(rr.dir / "distill" / "final")
        if r.fusion is not None:
            out["child fused"] = str(rr.dir / "fused")
    return out


def eval_stage(rr: RecipeRun) -> list[Step]:
    from open_nemotron.evaluate.multiple_choice import MCConfig
    from open_nemotron.evaluate.reasoning_eval import EvalConfig
    from open_nemotron.evaluate.throughput import SpeedConfig

    r, ev, out = rr.recipe, rr.recipe.eval, rr.dir / "eval"
    models = evaluated_models(rr)
    ups = model_steps(rr)
    steps: list[Step] = []

    def reasoning() -> None:
        from open_nemotron.evaluate.reasoning_eval import run as run_eval

        owned = {"models": list(models.values()), "json_out": str(out / "reasoning.json"), "device": r.device}
        run_eval(stage_config(EvalConfig, _with_seed(ev.reasoning, r), "eval.reasoning", owned), rr.progress)

    steps.append(Step("eval:reasoning", {"eval": _with_seed(ev.reasoning, r), "models": models}, ups, reasoning))
    if ev.if_suite is not None:
        suite = str(rr.path(ev.if_suite))
        if_options = _with_seed(ev.if_options, r)  # the run's section is the digest's: a new seed reruns it

        def instructions() -> None:
            from open_nemotron.evaluate.reasoning_eval import run as run_eval

            owned = {
                "models": list(models.values()),
                "suite": suite,
                "json_out": str(out / "if.json"),
                "device": r.device,
            }
            run_eval(stage_config(EvalConfig, if_options, "eval.if_options", owned), rr.progress)

        steps.append(Step("eval:if", {"eval": if_options, "suite": suite, "models": models}, ups, instructions))
    healing = retention_models(rr)
    heal_ups = ("convert",) if r.puzzle is None else tuple(dict.fromkeys(("convert", rr.model_upstream("child"))))
    if ev.mc_tasks:
        tasks = [str(rr.path(t)) for t in ev.mc_tasks]

        def multiple_choice() -> None:
            from open_nemotron.evaluate.multiple_choice import run as run_mc

            config = MCConfig(
                models=list(healing.values()),
                tasks=tasks,
                limit=ev.mc_limit,
                device=r.device,
                json_out=str(out / "mc.json"),
            )
            run_mc(config, rr.progress)

        settings = {"tasks": tasks, "limit": ev.mc_limit, "models": healing}
        steps.append(Step("eval:mc", settings, heal_ups, multiple_choice))
    speed_models = {"parent": str(rr.parent_dir)}
    if r.puzzle is not None:
        speed_models["child"] = str(rr.child_dir())

    def speed() -> None:
        from open_nemotron.evaluate.throughput import run as run_speed

        owned = {
            "models": [f"ours:{m}" for m in speed_models.values()],
            "json_out": str(out / "speed.json"),
            "device": r.device,
        }
        run_speed(stage_config(SpeedConfig, ev.speed, "eval.speed", owned), rr.progress)

    steps.append(Step("eval:speed", {"speed": ev.speed, "models": speed_models}, heal_ups, speed))
    return steps


def export_stage(rr: RecipeRun) -> list[Step]:
    r, ex = rr.recipe, rr.recipe.export
    name = "child" if "child" in r.models else r.models[0]
    model = rr.final_model(name)
    out = rr.dir / "export"

    def export() -> None:
        from open_nemotron.export.gguf import export_gguf
        from open_nemotron.export.vllm import ExportError, export_vllm

        result: dict[str, Any] = {"model": str(model), "name": name}
        for target, dtype, write in (
            (
                "gguf",
                ex.gguf_dtype,
                lambda d: export_gguf(model, out / f"{name}.gguf", dtype=d, tokenizer_pre=ex.gguf_tokenizer_pre),
            ),
            ("vllm", ex.vllm_dtype, lambda d: export_vllm(model, out / f"{name}-vllm", dtype=d)),
        ):
            if dtype is None:
                continue
            try:
                result[target] = {"path": str(write(dtype)), "dtype": dtype}
            except ExportError as err:  # what the engine cannot run is a finding for the report, not a failure
                result[target] = {"refused": str(err), "dtype": dtype}
        atomic_write_text(out / "export.json", json.dumps(result, indent=1))

    ups = tuple(s for s in model_steps(rr) if s.endswith(f":{name}")) or (rr.model_upstream(name),)
    return [Step("export", {"export": dataclasses.asdict(ex), "model": str(model)}, ups, export, (out,))]


def report_stage(rr: RecipeRun) -> list[Step]:
    def report() -> None:
        from open_nemotron.report import write_report

        write_report(rr)

    # The report reads every other step's output: their digests are its inputs, so it reruns after any of them.
    upstream = tuple(step.name for stage in STAGES if stage is not report_stage for step in stage(rr))
    return [Step("report", {}, upstream, report)]


STAGES: tuple[Callable[[RecipeRun], list[Step]], ...] = (
    convert_stage,
    puzzle_stage,
    distill_stage,
    fusion_stage,
    datagen_stage,
    sft_stage,
    rl_prompts_stage,
    pass_rate_stage,
    grpo_stage,
    rloo_stage,
    eval_stage,
    export_stage,
    report_stage,
)


def _say(progress: bool) -> Callable[[str], None]:
    from open_nemotron.puzzle.progress import step_printer

    return step_printer(progress)


def run(
    recipe: Recipe,
    run_dir: str | Path,
    base: Path = Path("."),
    progress: bool = True,
    echo: Callable[[str], None] = print,
    puzzle_timer=None,
) -> dict[str, Any]:
    """Every stage in order, each skipped when done with the same settings; returns report.json's content.
    `puzzle_timer`: Puzzle's costs timer (default: wall time); a test passes a deterministic one."""
    rr = RecipeRun(recipe, run_dir, base, progress, puzzle_timer)
    say = _say(progress)
    for stage in STAGES:
        for step in stage(rr):
            name = step.name
            start = time.perf_counter()
            say(f"{name}: checking")
            ran = rr.step(step)
            echo(f"{name:>16}: {f'{time.perf_counter() - start:7.1f} s' if ran else 'up to date'}")
    return json.loads((rr.dir / "report.json").read_text())


__all__ = ["Recipe", "RecipeError", "RecipeRun", "load_recipe", "recipe_from_dict", "run"]
