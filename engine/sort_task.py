"""The task the embedded default model is trained on: sort a short list of distinct digits.

Sorting suits block diffusion: every answer position depends on the whole list, and the model fills
all positions of the canvas together rather than left to right. Answers are checkable, so the
quality of a quantized file shows up as task accuracy, not only as a divergence.

Which lists are held out is a pure function of the list (a CRC of its text), so training never sees
an evaluation prompt whatever seed or order it uses.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np

MIN_LEN, MAX_LEN = 3, 6
HELD_OUT_MODULUS = 10  # one list in ten is never trained on
PROMPT_PREFIX = "Sort: "


@dataclass(frozen=True)
class Example:
    digits: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return PROMPT_PREFIX + " ".join(map(str, self.digits))

    @property
    def answer(self) -> str:
        return " ".join(map(str, sorted(self.digits)))


def is_held_out(digits: tuple[int, ...]) -> bool:
    return zlib.crc32(" ".join(map(str, digits)).encode()) % HELD_OUT_MODULUS == 0


def random_digits(rng: np.random.Generator, length: int) -> tuple[int, ...]:
    """`length` distinct digits in random order. (A first model trained on lists with repeats as
    well learnt to count repeats poorly at this size: 82% against 95% on distinct lists.)"""
    return tuple(int(d) for d in rng.permutation(10)[:length])


def training_examples(rng: np.random.Generator, length: int) -> Iterator[Example]:
    """An endless stream of training lists of one length (one length per batch keeps the prompts
    the same size, so batches need no padding)."""
    while True:
        digits = random_digits(rng, length)
        if not is_held_out(digits):
            yield Example(digits)


LEGACY_DRAWS = 1000  # the first lists are drawn as the published quality table's were (200 of them)


@cache
def held_out_lists() -> dict[int, tuple[tuple[int, ...], ...]]:
    """Every held-out list of distinct digits, by length (18,739 in all; enumerated in about 0.3 s)."""
    return {n: tuple(p for p in itertools.permutations(range(10), n) if is_held_out(p))
            for n in range(MIN_LEN, MAX_LEN + 1)}


def held_out_count() -> int:
    return sum(len(v) for v in held_out_lists().values())


def evaluation_set(n: int = 200, seed: int = 20261127) -> list[Example]:
    """A fixed set of `n` held-out lists, lengths spread evenly over MIN_LEN..MAX_LEN.

    The first LEGACY_DRAWS lists are drawn at random, one try per length in turn (the procedure the
    published figures used); past that, rejection sampling would slow down without bound as the
    held-out lists run out, so the rest of each length's lists follow in a seeded shuffled order,
    lengths taking turns. More lists than exist is a ValueError, never an endless loop."""
    if n < 0:
        raise ValueError(f"cannot take {n} examples")
    rng = np.random.default_rng(seed)
    out: list[Example] = []
    seen: set[tuple[int, ...]] = set()
    lengths = range(MIN_LEN, MAX_LEN + 1)
    first = min(n, LEGACY_DRAWS)  # lengths 4-6 alone hold far more: this loop ends
    while len(out) < first:
        for length in lengths:
            digits = random_digits(rng, length)
            if is_held_out(digits) and digits not in seen and len(out) < first:
                seen.add(digits)
                out.append(Example(digits))
    if n <= len(out):
        return out
    pools = held_out_lists()
    total = sum(len(v) for v in pools.values())
    if n > total:
        raise ValueError(f"only {total:,} held-out lists exist, {n:,} were asked for")
    rest = []
    for length in lengths:
        left = [d for d in pools[length] if d not in seen]
        rest.append([left[i] for i in rng.permutation(len(left))])
    for turn in itertools.zip_longest(*rest):
        out.extend(Example(d) for d in turn if d is not None)
    return out[:n]


_DIGITS = re.compile(r"^\s*([0-9](?:\s+[0-9])*)\s*$")


def is_correct(example: Example, output: str) -> bool:
    """The answer must be exactly the sorted digits separated by single spaces (surrounding
    whitespace allowed): a permutation, a missing digit or trailing junk is wrong."""
    m = _DIGITS.match(output)
    return bool(m) and m.group(1).split() == example.answer.split()


def parse_prompt(text: str) -> Example | None:
    """The example a prompt asks for, when it is one (`diffgemma run "Sort: 3 1 2"`)."""
    if not text.startswith(PROMPT_PREFIX):
        return None
    parts = text[len(PROMPT_PREFIX):].split()
    if not parts or not all(p.isdigit() and len(p) == 1 for p in parts):
        return None
    return Example(tuple(int(p) for p in parts))
