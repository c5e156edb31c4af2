"""Crash-safe writes: a conversion killed midway (SIGKILL: no handler, no cleanup) leaves no output
file and the previous one untouched; the next run succeeds and removes the dead run's partial file.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gguf_tools.atomic import atomic_path, pid_alive, remove_stale_partials
from gguf_tools.reader import GGUFFile
from gguf_tools.synthetic import tiny_config, write_checkpoint, write_tokenizer

REPO = Path(__file__).resolve().parents[2]
TYPE = "Q4_K_M"  # k-quants in NumPy: ~2 s for this checkpoint, time enough to be killed midway


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory) -> Path:
    """A synthetic checkpoint of 46 MiB (4 layers, 8 experts, hidden 512) in the released layout."""
    cfg, gen = tiny_config(512)
    cfg["text_config"].update(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=64, global_head_dim=128, num_global_key_value_heads=2,
                              layer_types=["sliding_attention"] * 3 + ["full_attention"], num_experts=8,
                              top_k_experts=2, moe_intermediate_size=256)
    src = tmp_path_factory.mktemp("big") / "big-ckpt"
    write_checkpoint(src, cfg, gen, seed=0)
    write_tokenizer(src, 512)
    return src


def quantize_cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", "import cli; cli.main()", "quantize", str(src), "-o", str(out), "--type", TYPE]


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.partial"))


def kill_midway(src: Path, out: Path, min_bytes: int = 1 << 20) -> Path:
    """Start a conversion, SIGKILL it once its partial file holds `min_bytes`; return that file."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(quantize_cmd(src, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    partial = out.with_name(f".{out.name}.{proc.pid}.partial")
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if partial.exists() and partial.stat().st_size >= min_bytes:
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"the conversion ended (rc {proc.returncode}) before it could be killed midway: "
                            f"{proc.stderr.read()[-500:] if proc.stderr else ''}")
            time.sleep(0.005)
        else:
            pytest.fail("the partial file never grew")
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return partial


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sigkill_midway_leaves_nothing_and_the_next_run_succeeds(big_ckpt, tmp_path):
    out = tmp_path / "model.gguf"
    partial = kill_midway(big_ckpt, out)
    assert not out.exists(), "a killed conversion left an output file"
    assert partial.exists() and partials(out) == [partial]  # killed midway: the dead process's partial file

    done = subprocess.run(quantize_cmd(big_ckpt, out), cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert partials(out) == [], "the stale partial of the killed run was not removed"
    f = GGUFFile(out)  # complete and valid: every offset inside the file, every tensor the keys imply
    assert len(f.tensors) == 98 and f.architecture == "diffusion-gemma"

    # killed while replacing an existing output: the previous file stays, byte for byte
    before = digest(out)
    partial = kill_midway(big_ckpt, out)
    assert digest(out) == before
    assert partials(out) == [partial]
    GGUFFile(out)


def test_stale_partials_only_of_dead_processes(tmp_path):
    target = tmp_path / "x.gguf"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        assert pid_alive(live.pid) and not pid_alive(dead.pid)
        files = {name: tmp_path / f".x.gguf.{pid}.partial" for name, pid in
                 (("live", live.pid), ("dead", dead.pid), ("mine", os.getpid()))}
        other = tmp_path / ".y.gguf.999999999.partial"  # another target's
        for p in [*files.values(), other]:
            p.write_bytes(b"partial")
        assert remove_stale_partials(target) == [files["dead"]]
        assert files["live"].exists() and files["mine"].exists() and other.exists()
    finally:
        live.kill()
        live.wait()


def test_atomic_path_failure_keeps_the_previous_file(tmp_path):
    target = tmp_path / "logits.npy"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"previous" and partials(target) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and partials(target) == []
