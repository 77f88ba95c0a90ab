"""The paper's RL curriculum ("progressive batching", digest §3.6), as a sampler TRL's GRPO trainer can use.

Difficulty is a prompt's pass rate (`open_nemotron.train.pass_rate`). Prompts are grouped into buckets of equal
pass rate. For batch t of T, a Gaussian target over the buckets' pass rates is centred at
``mu_t = hi - (hi - lo) * t / (T - 1)`` (easy, high pass rate, first; hard last) with width `sigma`; each bucket gives
``floor(weight * batch_size)`` prompts, or what it has left; the remaining slots are filled from the buckets with the
most prompts left; the batch is shuffled. Every prompt appears at most once per epoch (the buckets are drawn
without replacement), and T = len(prompts) // batch_size (TRL drops an incomplete last batch too). Because the
target is limited by what remains, the last batches of an epoch hold what earlier targets left over (with equal
supplies per bucket: the middle pass rates).

The centre schedule (linear) and the width are the paper's unstated choices (digest: "unconfirmed"); both are
parameters here. `random_batches` is the baseline the ablation compares against.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from open_nemotron.errors import OpenNemotronError


class CurriculumError(OpenNemotronError, ValueError):
    """Pass rates or batch settings the curriculum cannot use."""


def _check(pass_rates: Sequence[float], batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CurriculumError(f"batch_size = {batch_size!r}: expected a positive integer")
    bad = [(i, r) for i, r in enumerate(pass_rates) if not (isinstance(r, (int, float)) and 0 <= r <= 1)]
    if bad:
        raise CurriculumError(f"pass rate of prompt {bad[0][0]} = {bad[0][1]!r}: expected a number in [0, 1]")
    if len(pass_rates) < batch_size:
        raise CurriculumError(f"{len(pass_rates)} prompts for batches of {batch_size}: expected at least one batch")


def curriculum_batches(
    pass_rates: Sequence[float], batch_size: int, *, sigma: float = 0.15, seed: int = 0
) -> list[list[int]]:
    """One epoch of prompt indices in batches, easy to hard (module docstring)."""
    _check(pass_rates, batch_size)
    if not sigma > 0:
        raise CurriculumError(f"sigma = {sigma!r}: expected a positive number")
    rng = random.Random(seed)
    rates = sorted({round(float(r), 9) for r in pass_rates})
    buckets: dict[float, list[int]] = {r: [] for r in rates}
    for i, r in enumerate(pass_rates):
        buckets[round(float(r), 9)].append(i)
    for members in buckets.values():
        rng.shuffle(members)  # which prompt of a bucket comes first: random, not file order
    hi, lo = rates[-1], rates[0]
    n_batches = len(pass_rates) // batch_size
    batches = []
    for t in range(n_batches):
        mu = hi - (hi - lo) * t / max(n_batches - 1, 1)
        weights = [math.exp(-((r - mu) ** 2) / (2 * sigma**2)) for r in rates]
        total = sum(weights)
        batch: list[int] = []
        for r, w in zip(rates, weights, strict=True):
            take = min(math.floor(w / total * batch_size), len(buckets[r]))
            batch += [buckets[r].pop() for _ in range(take)]
        while len(batch) < batch_size:
            # Top up from the fullest bucket; ties go to the one nearest the target centre.
            fullest = max(rates, key=lambda r: (len(buckets[r]), -abs(r - mu)))
            batch.append(buckets[fullest].pop())
        rng.shuffle(batch)
        batches.append(batch)
    return batches


def random_batches(n_prompts: int, batch_size: int, *, seed: int = 0) -> list[list[int]]:
    """The baseline: one epoch in a random order, same batch count as `curriculum_batches`."""
    _check([0.0] * n_prompts, batch_size)
    order = list(range(n_prompts))
    random.Random(seed).shuffle(order)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(n_prompts // batch_size)]


def curriculum_sampler_class():
    """A `trl` RepeatSampler whose prompt order is the curriculum's (or a seeded random order) per epoch.

    TRL's GRPO sampler repeats each prompt `mini_repeat_count` times (the group of samples) and each generation
    batch `repeat_count` times (updates per rollout); only the order of the prompts changes here, so TRL's grouping
    and reuse of generations are untouched. The order is a function of (seed, epoch): a resumed run, which
    re-creates the sampler and skips the batches it has done, sees the very batches of an uninterrupted run."""
    from trl.trainer.utils import RepeatSampler

    class CurriculumRepeatSampler(RepeatSampler):
        def __init__(
            self,
            data_source,
            pass_rates: Sequence[float] | None,
            mini_repeat_count: int,
            batch_size: int,
            repeat_count: int = 1,
            sigma: float = 0.15,
            seed: int = 0,
        ) -> None:
            super().__init__(data_source, mini_repeat_count, batch_size, repeat_count, shuffle=False, seed=seed)
            if pass_rates is not None and len(pass_rates) != len(data_source):
                raise CurriculumError(f"{len(pass_rates)} pass rates for {len(data_source)} prompts")
            self.pass_rates, self.sigma, self.epoch = pass_rates, sigma, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def batches(self) -> list[list[int]]:
            seed = (self.seed or 0) * 1_000_003 + self.epoch
            if self.pass_rates is None:
                return random_batches(self.num_samples, self.batch_size, seed=seed)
            return curriculum_batches(self.pass_rates, self.batch_size, sigma=self.sigma, seed=seed)

        def __iter__(self) -> Iterator[int]:
            for chunk in self.batches():
                for _ in range(self.repeat_count):
                    for index in chunk:
                        for _ in range(self.mini_repeat_count):
                            yield index

    return CurriculumRepeatSampler
