"""Calibration tokens for Puzzle: three disjoint sets, from disjoint documents.

- ``train``: BLD training and the pruning / linear-fit inits;
- ``selection``: held out from training; every decision reads it: a linear variant's init-vs-BLD choice (and the
  library's held-out BLD losses) and the replace-1-block scores the MIP optimises;
- ``reporting``: held out from every decision; only the assembled children's held-out KL and top-1 agreement
  (report.json) are measured on it, so the reported quality is not biased by the choices made on `selection`.

Sources (``calibration.source``):
- ``parent`` (the default, needs no data): the parent answers a fixed, diverse prompt set (writing, code, science,
  chat, instructions) plus reasoning-task prompts, and the rendered conversations are the text. Puzzle only needs
  the parent's own distribution (the paper distils from the parent, never from its training data). Generated once
  per (parent weights, settings) and cached under the user cache directory.
- a local ``.jsonl`` (field ``text_field``, or chat rows with ``messages`` / ``input`` + ``output``), ``.parquet``
  or ``.txt`` (documents separated by blank lines), or a hub dataset id (``datasets.load_dataset``; offline only
  when cached).

Documents are split into train, selection and reporting *before* tokenising (a document feeds exactly one set), then
each set is tokenised, joined with EOS and cut into ``seq_len`` windows. Artifact: ``calibration/tokens.safetensors``
(``train`` [N, seq_len], ``selection`` [S, seq_len], ``reporting`` [R, seq_len], int64) and
``calibration/calibration.json``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from open_nemotron.errors import OpenNemotronError
from open_nemotron.puzzle.config import CalibrationConfig
from open_nemotron.puzzle.progress import step_printer
from open_nemotron.utils import atomic_write_text

# 2: parent text sampled on the engine (per-conversation seeded generators), not padded generate batches.
# 3: a conversation's draws no longer depend on the other conversations decoding beside it (engine.sample_rows), so
#    the text is the same at any slot count; 32 slots instead of 16.
CALIBRATION_VERSION = 3

# Engine slots the parent writes with: 1.54x the documents/s of 16 slots on a 2-core CPU, 64 slots only 1.60x
# (bench/calibration_slots.py, docs/benchmarks.md); the text does not depend on it.
GENERATION_SLOTS = 32

# Fixed, deliberately varied prompts: the parent's answers cover prose, lists, code, numbers and dialogue.
PROMPTS: tuple[str, ...] = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a ten-year-old.",
    "Write a Python function that checks whether a string is a palindrome, with a docstring and tests.",
    "What are the main causes of the French Revolution?",
    "Give me a recipe for a simple vegetable soup.",
    "Summarise the plot of Romeo and Juliet in five sentences.",
    "How does a binary search work? Show an example in JavaScript.",
    "Write a polite email asking a colleague to review a pull request.",
    "What is the difference between weather and climate?",
    "List ten tips for improving sleep quality.",
    "Explain the Pythagorean theorem and give a worked example.",
    "Describe the water cycle step by step.",
    "Write a haiku about autumn leaves, then explain its imagery.",
    "What is a neural network? Keep it brief and concrete.",
    "Compare renting and buying a home: pros and cons.",
    "Translate 'Good morning, how are you today?' into French, Spanish and German.",
    "Write a SQL query that finds the top five customers by total order value.",
    "Why is the sky blue?",
    "Plan a three-day trip to Rome for a first-time visitor.",
    "Explain recursion with a factorial example in C.",
    "What should I consider when adopting a dog?",
    "Write a limerick about a forgetful robot.",
    "How do vaccines train the immune system?",
    "Give an overview of the causes and effects of inflation.",
    "Write a bash script that counts the lines in every .txt file in a folder.",
    "What were the main achievements of the Apollo program?",
    "Explain what a hash table is and when to use one.",
    "Write a dialogue between a customer and a barista.",
    "How do I calculate compound interest? Give the formula and an example.",
    "Describe the rules of chess in simple terms.",
    "What is the role of mitochondria in a cell?",
    "Write a product description for a reusable water bottle.",
    "Explain the difference between a list and a tuple in Python.",
    "What are black holes and how do they form?",
    "Give advice to a student preparing for a maths exam.",
    "Write a short poem about the sea.",
    "How does public-key cryptography work?",
    "Summarise the benefits of regular exercise.",
    "Write a function in Rust that reverses a vector in place.",
    "What is the capital of Australia, and why was it chosen?",
    "Explain supply and demand with an everyday example.",
    "Write a thank-you note to a teacher.",
    "How do airplanes stay in the air?",
    "Describe three sorting algorithms and their time complexity.",
    "What is machine learning overfitting and how can it be prevented?",
    "Write instructions for planting a tomato seedling.",
    "Explain the greenhouse effect.",
    "Write a regular expression that matches email addresses and explain each part.",
)
# One-line openings the parent writes on from as plain text (calibration.generate_free_text): the register of web
# and reference text a base model was pretrained on (articles, how-tos, stories, news, Q&A, notes), topics spread
# wide. Written for this list; none is taken from an evaluation suite.
OPENINGS: tuple[str, ...] = (
    "The history of the bicycle",
    "How to repair a leaking kitchen tap",
    "Photosynthesis is",
    "In the small town of",
    "Frequently asked questions about solar panels",
    "The following recipe",
    "Chapter 1\n\n",
    "A beginner's guide to growing tomatoes",
    "The Roman Empire was",
    "When you are choosing a new pair of running shoes,",
    "Volcanoes form when",
    "Last week the city council voted",
    "Ten things to know before you adopt a cat",
    "The human heart has four chambers.",
    "Introduction\n\nIn this article we",
    "My grandmother kept a garden behind her house, and",
    "Water boils at 100 degrees Celsius at sea level, but",
    "How to clean a cast iron pan",
    "The Industrial Revolution began in",
    "Abstract\n\nWe study",
    "Electric cars work by",
    "To make a paper airplane that flies far,",
    "The planet Mars",
    "Once the dough has risen,",
    "Honeybees live in colonies that",
    "The stock market fell sharply on Monday after",
    "A simple way to save money on groceries is",
    "The theory of evolution by natural selection",
    "Step 1: Remove the old battery",
    "Ancient Egyptians built the pyramids",
    "The word 'democracy' comes from",
    "Our hotel was a short walk from the beach, and",
    "Glaciers move slowly because",
    "How do you change a flat tyre? First,",
    "The Great Barrier Reef",
    "In mathematics, a prime number is",
    "Product review: I bought this blender",
    "The team won the championship after",
    "Earthquakes are measured with",
    "If you want to learn to play the guitar,",
    "The printing press changed Europe because",
    "Dear neighbours,\n\n",
    "Why do leaves change colour in autumn?",
    "The local library is hosting",
    "Sharks have existed for",
    "Before you paint a wall, you should",
    "The French Revolution",
    "A healthy breakfast can include",
    "Thunderstorms develop when",
    "The museum's new exhibition",
    "How to fold a fitted sheet",
    "The moon orbits the Earth",
    "She opened the old wooden box and",
    "Recycling plastic bottles",
    "The first computers were",
    "Tips for a long car journey with children:",
    "Rainforests cover",
    "Interview with a firefighter\n\nQ:",
    "The rules of football are simple:",
    "To keep a houseplant healthy,",
    "Coffee was first grown in",
    "The bridge was completed in",
    "Magnets attract iron because",
    "A good night's sleep",
)
# Reasoning-task prompts (training seeds, never the held-out suite) in the mix, answered with thinking on.
REASONING_TASKS = ("chain_sum", "leg_counting", "simple_equations", "basic_arithmetic")


class CalibrationError(OpenNemotronError, ValueError):
    """Calibration text that cannot be read or is too short for the requested sequences."""


def generation_prompts(n: int, seed: int) -> list[tuple[list[dict], bool]]:
    """``n`` (conversation, thinking) pairs: the fixed prompts first, then reasoning-task prompts with thinking on."""
    prompts: list[tuple[list[dict], bool]] = [
        ([{"role": "user", "content": p}], False) for p in PROMPTS[: min(n, len(PROMPTS))]
    ]
    rest = n - len(prompts)
    if rest > 0:
        try:
            from open_nemotron.data.tasks import make_items
        except ImportError:  # the reasoning extra is not installed: cycle the fixed prompts instead
            make_items = None
        if make_items is None:
            prompts += [([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], True) for i in range(rest)]
        else:
            per = -(-rest // len(REASONING_TASKS))
            items = [it for t in REASONING_TASKS for it in make_items(t, per, seed=seed, difficulty="easy")]
            prompts += [([{"role": "user", "content": it.question}], True) for it in items[:rest]]
    return prompts


def parent_documents(model, tokenizer, config: CalibrationConfig, batch_size: int = GENERATION_SLOTS) -> list[str]:
    """Each prompt and the parent's sampled answer rendered as one chat document, then
    `config.generate_free_text` plain-text documents (an opening of `OPENINGS`, cycled, and the parent's sampled
    continuation; the sampling seed differs per document)."""
    from open_nemotron.model.chat import ensure_reasoning_template, generate_chat, generate_continuations
    from open_nemotron.model.chat_template import THINKING_OFF, THINKING_ON

    ensure_reasoning_template(tokenizer)
    pairs = generation_prompts(config.generate_prompts, config.seed)
    documents: list[str] = [""] * len(pairs)
    for thinking in (False, True):
        idx = [i for i, (_, t) in enumerate(pairs) if t == thinking]
        if not idx:
            continue
        replies = generate_chat(
            model,
            tokenizer,
            [pairs[i][0] for i in idx],
            thinking=thinking,
            max_new_tokens=config.generate_tokens,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            seed=config.seed,
            batch_size=batch_size,
        )
        for i, reply in zip(idx, replies, strict=True):
            system = {"role": "system", "content": THINKING_ON if thinking else THINKING_OFF}
            conversation = [system, *pairs[i][0], {"role": "assistant", "content": reply}]
            documents[i] = tokenizer.apply_chat_template(conversation, tokenize=False)
    if config.generate_free_text:
        openings = [OPENINGS[i % len(OPENINGS)] for i in range(config.generate_free_text)]
        continuations = generate_continuations(
            model,
            tokenizer,
            openings,
            max_new_tokens=config.generate_tokens,
            temperature=0.8,
            top_p=0.95,
            # Other streams than the chat answers' (request_seed(seed, i) is per row index).
            seed=config.seed + 1_000_003,
            batch_size=batch_size,
        )
        documents += [opening + text for opening, text in zip(openings, continuations, strict=True)]
    return documents


def _row_text(row: dict[str, Any], text_field: str) -> str | None:
    if isinstance(row.get(text_field), str):
        return row[text_field]
    messages = row.get("messages")
    if messages is None and isinstance(row.get("input"), list):
        messages = [*row["input"], {"role": "assistant", "content": row.get("output", "")}]
    if isinstance(messages, list):
        return "\n\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    return None


def file_documents(source: str, config: CalibrationConfig) -> list[str]:
    path = Path(source)
    if path.suffix == ".txt":
        return [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise CalibrationError(f"{path}:{n}: not valid JSON") from None
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise CalibrationError(f"calibration.source = {source!r}: expected a .jsonl, .parquet or .txt file")
    texts = [_row_text(r, config.text_field) for r in rows if isinstance(r, dict)]
    docs = [t for t in texts if t]
    if not docs:
        raise CalibrationError(
            f"{path}: no rows with a {config.text_field!r} string or chat messages (calibration.text_field)"
        )
    return docs


def hub_documents(source: str, config: CalibrationConfig) -> list[str]:
    import datasets

    try:
        data = datasets.load_dataset(source, split=config.split)
    except Exception as err:  # offline, unknown id, bad split: one clear line
        raise CalibrationError(
            f"calibration.source = {source!r}: cannot load it as a hub dataset ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); expected 'parent', a local file or a cached dataset id"
        ) from None
    docs = [t for t in (_row_text(r, config.text_field) for r in data) if t]
    if not docs:
        raise CalibrationError(f"{source}: no rows with a {config.text_field!r} string (calibration.text_field)")
    return docs


def windows(tokenizer, documents: list[str], seq_len: int, count: int, what: str) -> torch.Tensor:
    """Tokenise, join with EOS, cut into `count` windows of `seq_len` tokens (cycling the stream if it is short)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for doc in documents:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    needed = seq_len * count
    if len(stream) < seq_len:
        raise CalibrationError(
            f"calibration: the {what} documents give {len(stream)} tokens: expected at least seq_len = {seq_len}"
        )
    if len(stream) < needed:  # repeat rather than fail: a small local file still calibrates; reported in the json
        stream = (stream * (needed // len(stream) + 1))[:needed]
    return torch.tensor(stream[:needed], dtype=torch.long).view(count, seq_len)


SETS = ("train", "selection", "reporting")


def split_documents(documents: list[str], config: CalibrationConfig) -> dict[str, list[str]]:
    """Disjoint train / selection / reporting documents (a seeded shuffle): about one document in eight for each
    held-out set (at least one each), the rest for training. Each set keeps the shuffled order, because its windows
    are cut from the start of its token stream: in source order a small set's windows would all come from the first
    documents of the source (before 2026-12-02 they did: the parent source's held-out windows were then its answers
    to the fixed prompts only, never its free-text or reasoning documents)."""
    if len(documents) < 3:
        raise CalibrationError(
            f"calibration: {len(documents)} document(s): expected at least 3 (train, selection and reporting are "
            "disjoint)"
        )
    order = list(range(len(documents)))
    random.Random(config.seed).shuffle(order)
    n_held = max(1, len(documents) // 8)
    parts = {
        "selection": order[:n_held],
        "reporting": order[n_held : 2 * n_held],
        "train": order[2 * n_held :],
    }
    return {name: [documents[i] for i in parts[name]] for name in SETS}


def cache_key(parent_dir: Path, config: CalibrationConfig) -> str:
    from open_nemotron.model.loading import weights_digest

    text = json.dumps(
        {
            "v": CALIBRATION_VERSION,
            "weights": weights_digest(parent_dir),
            "generate_prompts": config.generate_prompts,
            "generate_tokens": config.generate_tokens,
            "seed": config.seed,
            # Only when used: chat-only settings keep the key (and the cache) they had before the field existed.
            **({"generate_free_text": config.generate_free_text} if config.generate_free_text else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build(
    parent_spec: str, config: CalibrationConfig, out_dir: Path, model=None, tokenizer=None, progress: bool = False
) -> dict[str, Any]:
    """Write ``tokens.safetensors`` + ``calibration.json`` into `out_dir` (skips if they exist for these settings)."""
    from safetensors.torch import save_file

    from open_nemotron.model.loading import load_model, load_tokenizer, resolve_model_dir
    from open_nemotron.utils import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "calibration.json"
    settings = {"config": asdict(config)}
    if not config.generate_free_text:  # as written before the field existed: those directories stay valid
        del settings["config"]["generate_free_text"]
    if meta_path.is_file() and (out_dir / "tokens.safetensors").is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings:
            return meta

    tokenizer = tokenizer or load_tokenizer(parent_spec)
    if config.source == "parent":
        parent_dir = resolve_model_dir(parent_spec)
        cache = _cache_dir() / cache_key(Path(parent_dir), config) / "documents.json"
        if cache.is_file():
            documents = json.loads(cache.read_text())
        else:
            model = model or load_model(parent_spec)
            step_printer(progress)(
                f"calibration: the parent answers {config.generate_prompts} prompts"
                + (f" and writes on from {config.generate_free_text} openings" if config.generate_free_text else "")
                + f" ({config.generate_tokens} new tokens each; cached afterwards)"
            )
            documents = parent_documents(model, tokenizer, config)
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps(documents))
    elif Path(config.source).suffix in (".jsonl", ".parquet", ".txt"):
        if not Path(config.source).is_file():
            raise CalibrationError(f"calibration.source = {config.source!r}: no such file")
        documents = file_documents(config.source, config)
    else:
        documents = hub_documents(config.source, config)

    docs = split_documents(documents, config)
    counts = {
        "train": config.train_sequences,
        "selection": config.selection_sequences,
        "reporting": config.reporting_sequences,
    }
    tokens = {name: windows(tokenizer, docs[name], config.seq_len, counts[name], name) for name in SETS}
    with atomic_path(out_dir / "tokens.safetensors") as tmp:
        save_file(tokens, str(tmp))
    meta = {
        "settings": settings,
        "documents": {name: len(docs[name]) for name in SETS},
        "tokens": {name: t.numel() for name, t in tokens.items()},
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return meta


def load_tokens(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = out_dir / "tokens.safetensors"
    if not path.is_file():
        raise CalibrationError(f"{path}: missing; run the calibration stage first (open-nemotron puzzle run)")
    tokens = load_file(str(path))
    missing = [name for name in SETS if name not in tokens]
    if missing:
        raise CalibrationError(
            f"{path}: no {', '.join(missing)} set (written by an older version); "
            "rerun `open-nemotron puzzle calibration`"
        )
    return tokens


def _cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("open-nemotron")) / "calibration"


def prepare(
    source: str,
    model_spec: str,
    out_dir: Path,
    *,
    text_field: str = "text",
    seq_len: int = 128,
    train_sequences: int = 192,
    reporting_sequences: int = 8,
    generate_prompts: int = 64,
    generate_tokens: int = 128,
    generate_free_text: int = 0,
    seed: int = 0,
    model=None,
    tokenizer=None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Token windows for a stage after Puzzle (distillation, fusion analysis): (`load_tokens`' sets, metadata).

    `source` a calibration directory already built (e.g. a Puzzle run's `calibration/`) is read as it is; anything
    else (`parent` = `model_spec`'s own answers, a local file, a hub id) is built into `out_dir` with these
    settings (the selection set keeps Puzzle's default size, so equal settings give Puzzle's very splits)."""
    path = Path(source)
    if path.is_dir():
        meta_path = path / "calibration.json"
        return load_tokens(path), json.loads(meta_path.read_text()) if meta_path.is_file() else None
    config = CalibrationConfig(
        source=source,
        text_field=text_field,
        seq_len=seq_len,
        train_sequences=train_sequences,
        reporting_sequences=reporting_sequences,
        generate_prompts=generate_prompts,
        generate_tokens=generate_tokens,
        generate_free_text=generate_free_text,
        seed=seed,
    )
    meta = build(model_spec, config, out_dir, model=model, tokenizer=tokenizer, progress=True)
    return load_tokens(out_dir), meta
