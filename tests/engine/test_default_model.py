"""The shipped default model: `diffgemma run` with no model converts it once and answers the task."""

from __future__ import annotations

import pytest

from engine import default_model
from engine.run import RunOptions, run_prompt
from engine.sort_task import evaluation_set, is_correct

N_PROMPTS = 40


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("default-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFGEMMA_CACHE", str(d))
    yield d
    mp.undo()


def test_run_without_a_model_answers_held_out_prompts(cache):
    right = 0
    for i, ex in enumerate(evaluation_set(N_PROMPTS)):
        r = run_prompt(None, ex.prompt, RunOptions(seed=i, device="cpu"))
        right += is_correct(ex, r.text)
    assert right / N_PROMPTS >= 0.9, f"{right}/{N_PROMPTS}"
    built = list(cache.glob("*.gguf"))
    assert len(built) == 1 and built[0].name.startswith(default_model.NAME)
    assert default_model.default_model_path() == built[0]  # converted once, then reused


def test_a_damaged_cache_file_is_rebuilt(cache):
    path = default_model.default_model_path()
    path.write_bytes(b"GGUF" + b"\0" * 20)
    assert default_model.default_model_path() == path
    assert path.stat().st_size > 1_000_000
