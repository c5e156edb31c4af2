import numpy as np

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
