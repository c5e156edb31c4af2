"""The shipped default model: `diffgemma run` with no model converts it once and answers the task."""

from __future__ import annotations

import shutil

import pytest

from engine import default_model
from engine.run import RunOptions, run_prompt
from engine.sort_task import evaluation_set, is_correct
from tests.cli_helpers import invoke, one_line_error

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


def test_a_truncated_cache_file_is_rebuilt(cache):
    path = default_model.default_model_path()
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    assert default_model.default_model_path() == path and path.read_bytes() == good


def test_an_unwritable_cache_is_one_line_naming_the_variable():
    r = invoke("run", "Sort: 3 1 2", env={"DIFFGEMMA_CACHE": "/sys/diffgemma-cache"})
    one_line_error(r, "/sys/diffgemma-cache", "DIFFGEMMA_CACHE")


def test_a_damaged_checkpoint_names_its_folder(tmp_path, monkeypatch):
    shipped = tmp_path / "models" / default_model.NAME
    shutil.copytree(default_model.SHIPPED, shipped)
    # what `quantize models/diffgemma-sort-tiny -o models/diffgemma-sort-tiny/model.safetensors` once did
    (shipped / "model.safetensors").write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(default_model, "SHIPPED", shipped)
    r = invoke("run", "Sort: 3 1 2", env={"DIFFGEMMA_CACHE": str(tmp_path / "cache")})
    one_line_error(r, str(shipped), "reinstall")
    assert not list((tmp_path / "cache").glob("*.gguf"))


def test_think_is_refused_for_the_built_in_model(cache):
    one_line_error(invoke("run", "Sort: 3 1 2", "--think"), "--think", "built-in model")
