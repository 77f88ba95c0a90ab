"""Filters for generated SFT rows, each counted in a `DataReport` (issue 5, item 4).

`run_filters` applies, in order (every stage returns the rows it keeps and a `StageResult` with counts):

1. ``format``: the row must pass the schema's checks (`example_from_row`: one think block at the start for
   reasoning on, no tags for off, toggle and mode agree, ...); removals are counted by the schema's reason keys.
2. ``answer``: `score_answer` on the output against the row's gold answer must be 1.0. Rows without a gold answer
   pass, counted apart (``no_gold_answer``). Rows of a task outside the registry are checked with math-verify.
3. ``length``: prompt plus output at most a per-mode limit, in tokens when a tokenizer is given, else characters.
4. ``exact_dedup``: one row per (normalised prompt, mode); the first is kept.
5. ``near_dedup``: per (task, mode), rows whose prompt *cores* have word-shingle Jaccard >= `threshold` with an
   earlier kept row are removed (MinHash + LSH to find candidates, exact Jaccard to decide; deterministic).
6. ``decontamination``: rows whose prompt overlaps a held-out question are removed (rule below).

Templates and cores. Procedural tasks wrap a short varying part (``812 + 880``) in long fixed text (``State the
final answer to the following arithmetic problem: … =`` plus the answer-format instruction), so raw n-gram overlap
says that every chain_sum prompt is a near-copy of every other. For a group of questions of one task, the *template*
is their longest common token prefix and suffix, and a question's *core* is what lies between. Text is compared as
tokens: NFKC, lowercase, runs of word characters or single punctuation marks (so ``-5*6`` is ``- 5 * 6``).

Decontamination rule. For each held-out question: its core (held-out template computed per task over the suite;
a task with one question has no template). With n = min(`ngram`, core length), a training prompt is contaminated
when it contains at least `min_overlap` (default 0.5) of the core's distinct token n-grams. Consequences:

* a held-out question pasted anywhere into a training prompt contains its whole core: removed;
* an ordinary training prompt of the same task shares the template but not the core: kept, even when its numbers
  partly coincide (``812 + 5`` against ``812 + 880``);
* a short core (chain_sum, gcd) is one n-gram, so the test is containment of the whole varying part, at token
  boundaries. That also removes a training expression that embeds a held-out one (``-9 * -1 / 1 + 2`` holds
  ``-1 / 1 + 2``; 1 of 300 medium basic_arithmetic prompts): conservative on purpose. Cores shorter than
  `min_core_tokens` (default 3) would match too easily and need the whole held-out question instead;
* long cores (word problems, animal lists) need half of their 13-grams: a pasted or truncated copy is caught, and so
  is a near-verbatim retelling (gsm_symbolic re-tells some held-out stories with a name or one to three numbers
  changed: 8 of 400 medium training prompts removed), while other prompts from the same story template share too
  few 13-grams (a plain "any shared 13-gram" rule would remove 107 of those 400). A fragment of less than about
  half of a long held-out question is not caught.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from open_nemotron.data.schema import Example, MalformedRowError, RowReport, example_from_row, example_to_row
from open_nemotron.errors import OpenNemotronError
from open_nemotron.utils import atomic_write_text

if TYPE_CHECKING:
    from open_nemotron.data.tasks import TaskItem

# Defaults: prompt + output per mode. Reasoning traces are long; answers alone are short.
DEFAULT_MAX_TOKENS: dict[str, int] = {"on": 4096, "off": 1024}
DEFAULT_MAX_CHARS: dict[str, int] = {"on": 16000, "off": 4000}
NEAR_DUP_THRESHOLD = 0.9
NEAR_DUP_SHINGLE = 3
DECONTAM_NGRAM = 13
DECONTAM_MIN_OVERLAP = 0.5
MIN_CORE_TOKENS = 3
# Task groups smaller than this keep their whole prompts for near-dedup: a template of two prompts is not a template.
MIN_TEMPLATE_GROUP = 8

_TOKEN = re.compile(r"\w+|[^\w\s]")
_MERSENNE = (1 << 61) - 1


class FilterError(OpenNemotronError, ValueError):
    """Bad filter settings (thresholds, limits)."""


# ----------------------------------------------------------------------------------------------------- report


@dataclass
class StageResult:
    """One stage's counts: rows in and out, removals by reason, and rows let through unchecked by reason."""

    name: str
    rows_in: int
    rows_out: int
    removed: dict[str, int] = field(default_factory=dict)
    passed_unchecked: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "removed": dict(sorted(self.removed.items())),
            "passed_unchecked": dict(sorted(self.passed_unchecked.items())),
        }


@dataclass
class DataReport:
    """Counts in and out of every stage, plus per-mode totals and the settings used."""

    stages: list[StageResult] = field(default_factory=list)
    by_mode_in: dict[str, int] = field(default_factory=dict)
    by_mode_out: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_in(self) -> int:
        return self.stages[0].rows_in if self.stages else 0

    @property
    def rows_out(self) -> int:
        return self.stages[-1].rows_out if self.stages else 0

    def stage(self, name: str) -> StageResult:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "by_mode_in": dict(sorted(self.by_mode_in.items())),
            "by_mode_out": dict(sorted(self.by_mode_out.items())),
            "stages": [stage.to_dict() for stage in self.stages],
            "settings": self.settings,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def to_markdown(self) -> str:
        def reasons(counts: Mapping[str, int]) -> str:
            return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) or "-"

        modes = sorted(set(self.by_mode_in) | set(self.by_mode_out))
        lines = [
            "# Data report",
            "",
            f"{self.rows_out} of {self.rows_in} rows kept"
            + (
                " (" + ", ".join(f"{m}: {self.by_mode_out.get(m, 0)}/{self.by_mode_in.get(m, 0)}" for m in modes) + ")"
                if modes
                else ""
            )
            + ".",
            "",
            "| stage | in | out | removed | removed by reason | passed unchecked |",
            "|---|---:|---:|---:|---|---|",
        ]
        for s in self.stages:
            lines.append(
                f"| {s.name} | {s.rows_in} | {s.rows_out} | {s.rows_in - s.rows_out} | {reasons(s.removed)} "
                f"| {reasons(s.passed_unchecked)} |"
            )
        if self.settings:
            lines += ["", "Settings: " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in self.settings.items()) + "."]
        return "\n".join(lines) + "\n"

    def write(self, json_path: str | Path, markdown_path: str | Path | None = None) -> tuple[Path, Path]:
        """Write the JSON and the markdown (default: beside the JSON, ``.md``), each atomically."""
        json_path = Path(json_path)
        md_path = Path(markdown_path) if markdown_path is not None else json_path.with_suffix(".md")
        atomic_write_text(json_path, self.to_json())
        atomic_write_text(md_path, self.to_markdown())
        return json_path, md_path


# ----------------------------------------------------------------------------------------------------- text


def tokens(text: str) -> list[str]:
    """Normalised tokens: NFKC, lowercase, runs of word characters or single punctuation characters."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def prompt_text(ex: Example) -> str:
    """The user messages of the prompt, joined (what is compared for duplicates and contamination)."""
    return "\n".join(m["content"] for m in ex.input if m["role"] == "user")


def _dedup_key(ex: Example) -> tuple[str, str]:
    turns = " ".join(f"{m['role']}: {' '.join(tokens(m['content']))}" for m in ex.input)
    return turns, ex.reasoning


def shared_template(token_lists: Sequence[Sequence[str]]) -> tuple[int, int]:
    """``(prefix, suffix)``: lengths of the longest common token prefix and suffix of all lists (not overlapping)."""
    if len(token_lists) < 2:
        return 0, 0
    shortest = min(len(t) for t in token_lists)
    first = token_lists[0]
    prefix = 0
    while prefix < shortest and all(t[prefix] == first[prefix] for t in token_lists):
        prefix += 1
    suffix = 0
    while suffix < shortest - prefix and all(
        t[len(t) - 1 - suffix] == first[len(first) - 1 - suffix] for t in token_lists
    ):
        suffix += 1
    return prefix, suffix


def core(toks: Sequence[str], template: tuple[int, int]) -> list[str]:
    """`toks` without the template's prefix and suffix; the whole list when that would leave nothing."""
    prefix, suffix = template
    middle = list(toks[prefix : len(toks) - suffix])
    return middle if middle else list(toks)


def ngrams(toks: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# ---------------------------------------------------------------------------------------------------- stages


def _count_modes(examples: Iterable[Example]) -> dict[str, int]:
    return dict(Counter(ex.reasoning for ex in examples))


def check_format(examples: Sequence[Example]) -> tuple[list[Example], StageResult]:
    """Keep rows that pass the schema's checks (`example_from_row` on the row); count the rest by reason."""
    kept, removed = [], Counter()
    for ex in examples:
        try:
            example_from_row(example_to_row(ex))
        except MalformedRowError as err:
            removed[err.reason] += 1
            continue
        kept.append(ex)
    return kept, StageResult("format", len(examples), len(kept), dict(removed))


def _scorable_item(ex: Example) -> TaskItem:
    from open_nemotron.data.generate import item_from_example
    from open_nemotron.data.tasks import MATH_SCORER, TASKS

    item = item_from_example(ex)
    if item.task not in TASKS and item.entry.get("scorer") != MATH_SCORER:
        # Rows from other sources (math jsonl, NVIDIA's data) carry only a gold string: compare with math-verify.
        item.entry = {**item.entry, "scorer": MATH_SCORER}
    return item


def verify_answers(examples: Sequence[Example]) -> tuple[list[Example], StageResult]:
    """Keep rows whose output's final answer scores 1.0 against the row's gold answer; rows with none pass, counted."""
    from open_nemotron.data.tasks import score_answer

    kept, removed, unchecked = [], Counter(), Counter()
    for ex in examples:
        if ex.answer is None or not ex.answer.strip():
            unchecked["no_gold_answer"] += 1
            kept.append(ex)
            continue
        if score_answer(_scorable_item(ex), ex.output) == 1.0:
            kept.append(ex)
        else:
            removed["wrong_answer"] += 1
    return kept, StageResult("answer", len(examples), len(kept), dict(removed), dict(unchecked))


def limit_lengths(
    examples: Sequence[Example], max_length: Mapping[str, int] | None = None, tokenizer: Any = None
) -> tuple[list[Example], StageResult]:
    """Keep rows whose prompt + output fit the limit for their mode (tokens with `tokenizer`, else characters).

    `max_length` maps mode to limit; a mode it does not name is unlimited. Default: `DEFAULT_MAX_TOKENS` with a
    tokenizer, `DEFAULT_MAX_CHARS` without.
    """
    limits = (
        dict(max_length)
        if max_length is not None
        else dict(DEFAULT_MAX_TOKENS if tokenizer is not None else DEFAULT_MAX_CHARS)
    )
    for mode, limit in limits.items():
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise FilterError(f"max_length[{mode!r}] = {limit!r}: expected a positive integer")
    unit = "tokens" if tokenizer is not None else "chars"
    kept, removed = [], Counter()
    for ex in examples:
        limit = limits.get(ex.reasoning)
        if limit is None:
            kept.append(ex)
            continue
        text = "\n".join(m["content"] for m in ex.input) + "\n" + ex.output
        size = len(tokenizer.encode(text, add_special_tokens=False)) if tokenizer is not None else len(text)
        if size <= limit:
            kept.append(ex)
        else:
            removed[f"too_long_{ex.reasoning}_{unit}"] += 1
    return kept, StageResult("length", len(examples), len(kept), dict(removed))


def drop_exact_duplicates(examples: Sequence[Example]) -> tuple[list[Example], StageResult]:
    """One row per (normalised prompt, mode): the first occurrence is kept."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for ex in examples:
        key = _dedup_key(ex)
        if key in seen:
            continue
        seen.add(key)
        kept.append(ex)
    removed = len(examples) - len(kept)
    return kept, StageResult("exact_dedup", len(examples), len(kept), {"duplicate": removed} if removed else {})


class MinHasher:
    """Deterministic MinHash signatures of string-tuple shingles (blake2b + fixed universal hash permutations)."""

    def __init__(self, num_perm: int = 64, seed: int = 1234) -> None:
        rng = random.Random(seed)
        self.perms = [(rng.randrange(1, _MERSENNE), rng.randrange(0, _MERSENNE)) for _ in range(num_perm)]

    @staticmethod
    def _hash(shingle: tuple[str, ...]) -> int:
        return int.from_bytes(hashlib.blake2b("\x1f".join(shingle).encode(), digest_size=8).digest(), "little")

    def signature(self, shingles: set[tuple[str, ...]]) -> tuple[int, ...]:
        hashes = [self._hash(s) for s in shingles] or [0]
        return tuple(min((a * h + b) % _MERSENNE for h in hashes) for a, b in self.perms)


def _shingles(toks: Sequence[str], k: int) -> set[tuple[str, ...]]:
    return ngrams(toks, min(k, len(toks))) if toks else set()


def drop_near_duplicates(
    examples: Sequence[Example],
    threshold: float = NEAR_DUP_THRESHOLD,
    *,
    shingle: int = NEAR_DUP_SHINGLE,
    bands: int = 16,
    rows_per_band: int = 4,
) -> tuple[list[Example], StageResult]:
    """Remove rows whose prompt core is near-identical (Jaccard >= `threshold`) to an earlier kept row's.

    Rows are compared within (task, mode). Groups of at least `MIN_TEMPLATE_GROUP` rows have their shared template
    removed first (see the module docstring); smaller groups compare whole prompts. Shingles are token `shingle`-grams
    (the whole core when shorter). MinHash with ``bands * rows_per_band`` permutations proposes candidates; the exact
    Jaccard of the shingle sets decides, so the result does not depend on hash luck beyond recall.
    """
    if not 0 < threshold <= 1:
        raise FilterError(f"near-duplicate threshold = {threshold}: expected a number in (0, 1]")
    hasher = MinHasher(bands * rows_per_band)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    toks = [tokens(prompt_text(ex)) for ex in examples]
    for i, ex in enumerate(examples):
        groups[(ex.task or "", ex.reasoning)].append(i)
    drop: set[int] = set()
    for members in groups.values():
        template = shared_template([toks[i] for i in members]) if len(members) >= MIN_TEMPLATE_GROUP else (0, 0)
        buckets: dict[tuple[int, tuple[int, ...]], list[int]] = defaultdict(list)
        kept_shingles: dict[int, set] = {}
        for i in members:
            sh = _shingles(core(toks[i], template), shingle)
            sig = hasher.signature(sh)
            keys = [(b, sig[b * rows_per_band : (b + 1) * rows_per_band]) for b in range(bands)]
            candidates = {j for key in keys for j in buckets.get(key, ())}
            if any(jaccard(sh, kept_shingles[j]) >= threshold for j in sorted(candidates)):
                drop.add(i)
                continue
            kept_shingles[i] = sh
            for key in keys:
                buckets[key].append(i)
    kept = [ex for i, ex in enumerate(examples) if i not in drop]
    return kept, StageResult("near_dedup", len(examples), len(kept), {"near_duplicate": len(drop)} if drop else {})


@dataclass
class HeldoutIndex:
    """The held-out cores' n-grams, indexed for `decontaminate` (build once with `HeldoutIndex.build`)."""

    grams: dict[tuple[str, ...], list[int]]  # n-gram -> held-out question numbers
    needed: list[int]  # per held-out question: distinct n-grams it has (0: uses whole-question containment)
    lengths: list[int]  # distinct n-gram lengths in the index
    whole: list[tuple[int, str]]  # (question number, normalised question) for cores too short to use
    tasks: list[str]  # task per question
    labels: list[str]  # "task seed N" per question, for messages
    ngram: int
    min_overlap: float

    @classmethod
    def build(
        cls,
        questions: Sequence[tuple[str, str, str]],
        *,
        ngram: int = DECONTAM_NGRAM,
        min_overlap: float = DECONTAM_MIN_OVERLAP,
        min_core_tokens: int = MIN_CORE_TOKENS,
    ) -> HeldoutIndex:
        """`questions` are ``(task, question, label)``; templates are computed per task."""
        if ngram < 1:
            raise FilterError(f"decontamination n-gram = {ngram}: expected a positive integer")
        if not 0 < min_overlap <= 1:
            raise FilterError(f"decontamination overlap = {min_overlap}: expected a number in (0, 1]")
        toks = [tokens(q) for _, q, _ in questions]
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, (task, _, _) in enumerate(questions):
            by_task[task].append(i)
        grams: dict[tuple[str, ...], list[int]] = defaultdict(list)
        needed = [0] * len(questions)
        whole = []
        lengths: set[int] = set()
        for members in by_task.values():
            template = shared_template([toks[i] for i in members])
            for i in members:
                c = core(toks[i], template)
                if len(c) < min_core_tokens:
                    whole.append((i, " " + " ".join(toks[i]) + " "))
                    continue
                n = min(ngram, len(c))
                own = ngrams(c, n)
                needed[i] = len(own)
                lengths.add(n)
                for g in own:
                    grams[g].append(i)
        return cls(
            dict(grams),
            needed,
            sorted(lengths),
            whole,
            [task for task, _, _ in questions],
            [label for _, _, label in questions],
            ngram,
            min_overlap,
        )

    def contaminated_by(self, text: str) -> int | None:
        """The number of a held-out question `text` overlaps, or None."""
        toks = tokens(text)
        hits: dict[int, int] = Counter()
        for n in self.lengths:
            for g in ngrams(toks, n):
                for i in self.grams.get(g, ()):
                    hits[i] += 1
        for i, count in sorted(hits.items()):
            if count >= self.min_overlap * self.needed[i]:
                return i
        if self.whole:
            joined = " " + " ".join(toks) + " "
            for i, question in self.whole:
                if question in joined:
                    return i
        return None


def heldout_questions(items: Sequence[TaskItem]) -> list[tuple[str, str, str]]:
    """``(task, question, label)`` for `HeldoutIndex.build`, from held-out `TaskItem`s."""
    return [(item.task, item.question, f"{item.task} seed {item.seed}") for item in items]


def decontaminate(
    examples: Sequence[Example],
    heldout: Sequence[TaskItem] | HeldoutIndex,
    *,
    ngram: int = DECONTAM_NGRAM,
    min_overlap: float = DECONTAM_MIN_OVERLAP,
) -> tuple[list[Example], StageResult]:
    """Remove rows whose prompt overlaps a held-out question (rule in the module docstring).

    Removals are counted per held-out task as ``overlaps_heldout:<task>``, so a report shows where they came from.
    """
    index = (
        heldout
        if isinstance(heldout, HeldoutIndex)
        else HeldoutIndex.build(heldout_questions(heldout), ngram=ngram, min_overlap=min_overlap)
    )
    kept, removed = [], Counter()
    for ex in examples:
        hit = index.contaminated_by(prompt_text(ex))
        if hit is None:
            kept.append(ex)
            continue
        removed[f"overlaps_heldout:{index.tasks[hit]}"] += 1
    return kept, StageResult("decontamination", len(examples), len(kept), dict(removed))


# ---------------------------------------------------------------------------------------------------- pipeline


def run_filters(
    examples: Sequence[Example],
    *,
    heldout: Sequence[TaskItem] | HeldoutIndex | None = None,
    tokenizer: Any = None,
    max_length: Mapping[str, int] | None = None,
    near_dup_threshold: float = NEAR_DUP_THRESHOLD,
    decontam_ngram: int = DECONTAM_NGRAM,
    decontam_min_overlap: float = DECONTAM_MIN_OVERLAP,
    verify: bool = True,
    row_report: RowReport | None = None,
) -> tuple[list[Example], DataReport]:
    """All stages in order; returns the kept rows and the report.

    `heldout` defaults to the fixed suite (`open_nemotron.data.tasks.heldout_suite()`); pass ``[]`` to skip the
    check (the stage still appears, with nothing removed). `verify=False` lets every row through the answer stage,
    counted as ``verification_off``. A `row_report` from `load_examples` becomes a first ``load`` stage, so rows
    dropped as malformed while reading are in the same report.
    """
    if heldout is None:
        from open_nemotron.data.tasks import heldout_suite

        heldout = heldout_suite()
    index = (
        heldout
        if isinstance(heldout, HeldoutIndex)
        else HeldoutIndex.build(heldout_questions(heldout), ngram=decontam_ngram, min_overlap=decontam_min_overlap)
    )
    report = DataReport(
        settings={
            "max_length": dict(max_length)
            if max_length is not None
            else dict(DEFAULT_MAX_TOKENS if tokenizer is not None else DEFAULT_MAX_CHARS),
            "length_unit": "tokens" if tokenizer is not None else "chars",
            "near_dup_threshold": near_dup_threshold,
            "near_dup_shingle": NEAR_DUP_SHINGLE,
            "decontam_ngram": index.ngram,
            "decontam_min_overlap": index.min_overlap,
            "heldout_questions": len(index.tasks),
            "verify": verify,
        }
    )
    if row_report is not None:
        report.stages.append(StageResult("load", row_report.total, row_report.kept, dict(row_report.dropped)))
    rows = list(examples)
    report.by_mode_in = _count_modes(rows)

    rows, stage = check_format(rows)
    report.stages.append(stage)
    if verify:
        rows, stage = verify_answers(rows)
    else:
        stage = StageResult("answer", len(rows), len(rows), {}, {"verification_off": len(rows)} if rows else {})
    report.stages.append(stage)
    rows, stage = limit_lengths(rows, max_length, tokenizer)
    report.stages.append(stage)
    rows, stage = drop_exact_duplicates(rows)
    report.stages.append(stage)
    rows, stage = drop_near_duplicates(rows, near_dup_threshold)
    report.stages.append(stage)
    rows, stage = decontaminate(rows, index)
    report.stages.append(stage)

    report.by_mode_out = _count_modes(rows)
    return rows, report
