"""The task the embedded default model is trained on: sort a short list of distinct digits.

Sorting suits block diffusion: every answer position depends on the whole list, and the model fills
all positions of the canvas together rather than left to right. Answers are checkable, so the
quality of a quantized file shows up as task accuracy, not only as a divergence.

Which lists are held out is a pure function of the list (a CRC of its text), so training never sees
an evaluation prompt whatever seed or order it uses.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

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


def evaluation_set(n: int = 200, seed: int = 20261127) -> list[Example]:
    """A fixed set of held-out lists, lengths spread evenly over MIN_LEN..MAX_LEN."""
    rng = np.random.default_rng(seed)
    out: list[Example] = []
    seen: set[tuple[int, ...]] = set()
    lengths = range(MIN_LEN, MAX_LEN + 1)
    while len(out) < n:
        for length in lengths:
            digits = random_digits(rng, length)
            if is_held_out(digits) and digits not in seen and len(out) < n:
                seen.add(digits)
                out.append(Example(digits))
    return out


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
