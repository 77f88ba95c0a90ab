"""docs/puzzle.md's config table covers every config field and every field the recipes set."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from open_nemotron.puzzle.config import PuzzleConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


def documented_fields() -> set[str]:
    """Names in the first cell of the config table's rows: `a.b`, `c` -> a.b, a.c."""
    text = (ROOT / "docs" / "puzzle.md").read_text()
    table = text[text.index("## Config reference") :]
    names = set()
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split("|")[1]
        fields = re.findall(r"`([^`]+)`", cell)
        section = fields[0].rsplit(".", 1)[0] if "." in fields[0] else ""
        names.add(fields[0])
        names.update(f"{section}.{f}" if section and "." not in f else f for f in fields[1:])
    return names


def config_fields(cls=PuzzleConfig, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out |= config_fields(type(default), f"{name}.")
        else:
            out.add(name)
    return out


def recipe_fields(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        if isinstance(value, dict):
            out |= recipe_fields(value, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def test_every_config_field_is_in_the_docs_table():
    assert config_fields() - documented_fields() == set()


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("puzzle-*.yaml")), ids=lambda p: p.name)
def test_every_recipe_field_is_documented_and_the_recipe_loads(recipe):
    load_config(recipe)
    assert recipe_fields(yaml.safe_load(recipe.read_text())) - documented_fields() == set()
