import numpy as np
import pytest

from engine.sort_task import (
    MAX_LEN,
    MIN_LEN,
    Example,
    evaluation_set,
    is_correct,
    is_held_out,
    parse_prompt,
    training_examples,
)


def test_training_stream_never_yields_a_held_out_list():
    rng = np.random.default_rng(0)
    for n in range(MIN_LEN, MAX_LEN + 1):
        stream = training_examples(rng, n)
        batch = [next(stream) for _ in range(500)]
        assert all(len(set(e.digits)) == n and not is_held_out(e.digits) for e in batch)


def test_evaluation_set_is_fixed_held_out_and_spread_over_lengths():
    a, b = evaluation_set(60), evaluation_set(60)
    assert a == b and len(set(a)) == 60
    assert all(is_held_out(e.digits) and len(set(e.digits)) == len(e.digits) for e in a)
    assert {len(e.digits) for e in a} == set(range(MIN_LEN, MAX_LEN + 1))
    # one list in ten is held out: a uniform sample shows about that share
    rng = np.random.default_rng(1)
    share = np.mean([is_held_out(tuple(rng.integers(0, 10, 5).tolist())) for _ in range(5000)])
    assert 0.08 < share < 0.12


def test_answers_are_checked_exactly():
    ex = Example((5, 2, 8, 2))
    assert ex.prompt == "Sort: 5 2 8 2" and ex.answer == "2 2 5 8"
    assert is_correct(ex, "2 2 5 8") and is_correct(ex, " 2 2 5 8\n")
    for wrong in ("2 5 8", "2 2 8 5", "2 2 5 8 9", "2 2 5 8.", "", "2  2 5 8x"):
        assert not is_correct(ex, wrong), wrong


def test_parse_prompt_round_trips():
    ex = Example((3, 1, 2))
    assert parse_prompt(ex.prompt) == ex
    assert parse_prompt("Sort: 12 3") is None and parse_prompt("hello") is None and parse_prompt("Sort:") is None


def legacy_evaluation_set(n: int, seed: int = 20261127) -> list[Example]:
    """The procedure the published quality table used (before the set was bounded)."""
    from engine.sort_task import random_digits

    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < n:
        for length in range(MIN_LEN, MAX_LEN + 1):
            digits = random_digits(rng, length)
            if is_held_out(digits) and digits not in seen and len(out) < n:
                seen.add(digits)
                out.append(Example(digits))
    return out


def test_the_published_sets_are_unchanged():
    for n in (40, 200, 1000):
        assert evaluation_set(n) == legacy_evaluation_set(n)


def test_every_held_out_list_can_be_asked_for_and_no_more():
    import itertools

    from engine.sort_task import held_out_count

    every = {p for k in range(MIN_LEN, MAX_LEN + 1) for p in itertools.permutations(range(10), k) if is_held_out(p)}
    assert held_out_count() == len(every) == 18739
    full = evaluation_set(len(every))  # bounded: no rejection sampling once the lists run out
    assert {e.digits for e in full} == every and len(full) == len(every)
    assert full[:1000] == evaluation_set(1000)
    with pytest.raises(ValueError, match="18,739"):
        evaluation_set(len(every) + 1)
