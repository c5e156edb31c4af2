"""`--threads N`: the chunk jobs run in worker processes, the file stays byte for byte the one-thread file
(and llama-quantize's), the progress reports every chunk, and one job stays within the stated memory."""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from typer.testing import CliRunner

from gguf_tools import convert as conv
from gguf_tools.arch import GEMMA4_ARCH
from gguf_tools.imatrix import load_imatrix, save_gguf_imatrix
from gguf_tools.parallel_quant import PEAK_PER_WORKER_MIB, Shared, ThreadsError, check_threads, ordered_map
from gguf_tools.reader import GGUFFile
from gguf_tools.requantize import GGUFRows, _open_validated, requantize
from gguf_tools.safetensors_io import read_header
from tests.cli_helpers import one_line_error


class Recorder:
    def __init__(self):
        self.calls: list[tuple[str, int, bool]] = []
        self.total = self.count = 0

    def start(self, n_tensors: int, n_bytes: int) -> None:
        self.count, self.total = n_tensors, n_bytes

    def advance(self, name: str, n_bytes: int, tensor_done: bool = True) -> None:
        self.calls.append((name, n_bytes, tensor_done))

    def finish(self, ok: bool = True) -> None:
        pass


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4096 values, so every weight is several jobs and the order of results matters."""
    monkeypatch.setattr(conv, "CHUNK_ELEMENTS", 4096)


def _imatrix(gguf: Path, out: Path, seed: int = 3):
    rng = np.random.default_rng(seed)
    stats = {}
    for name, t in GGUFFile(gguf).tensors.items():
        if name.startswith("blk.") and len(t.shape) >= 2 and "_norm" not in name and "ffn_gate_inp" not in name:
            n_mat = t.shape[0] if len(t.shape) == 3 else 1
            counts = rng.integers(8, 500, n_mat).astype(np.float32)
            stats[name] = ((rng.gamma(0.7, 2.0, (n_mat, t.shape[-1])) * counts[:, None]).astype(np.float32), counts)
    return load_imatrix(save_gguf_imatrix(out, stats))


def test_ordered_map_keeps_order_and_raises_the_first_error():
    jobs = [lambda i=i: i * i for i in range(7)]
    assert list(ordered_map(jobs, 1)) == [i * i for i in range(7)]
    with pytest.raises(ThreadsError, match="at least 1"):
        check_threads(0)
    assert check_threads(None) >= 1 and check_threads(3) == 3


def test_threads_give_the_one_thread_file(tiny_ckpt, tmp_path, small_chunks):
    """convert (checkpoint -> Q4_K_M with an imatrix) and requantize (BF16 GGUF -> Q5_K_M): 2 workers,
    results in order, same bytes; the progress gets every chunk and ends at the planned total."""
    src = tiny_ckpt[0]
    bf16, _ = conv.convert(src, tmp_path / "m-BF16.gguf", "BF16")
    im = _imatrix(bf16, tmp_path / "im.gguf")
    one, plan = conv.convert(src, tmp_path / "one.gguf", "Q4_K_M", imatrix=im)
    bar = Recorder()
    two, _ = conv.convert(src, tmp_path / "two.gguf", "Q4_K_M", imatrix=im, threads=2, reporter=bar)
    assert one.read_bytes() == two.read_bytes()
    assert sum(n for _, n, _ in bar.calls) == bar.total == plan.total_bytes
    assert [n for n, _, done in bar.calls if done] == [t.name for t in plan.tensors]
    multi = [t for t in plan.tensors if int(np.prod(t.shape)) > conv.CHUNK_ELEMENTS]
    assert multi and len(bar.calls) >= len(plan.tensors) + len(multi)  # chunk by chunk, not tensor by tensor
    r1, _ = requantize(bf16, tmp_path / "r1.gguf", "Q5_K_M", imatrix=im)
    r2, _ = requantize(bf16, tmp_path / "r2.gguf", "Q5_K_M", imatrix=im, threads=3)
    assert r1.read_bytes() == r2.read_bytes()


def test_threads_match_llama_quantize(tmp_path):
    """Two workers against llama_model_quantize with two threads, through the parity tests' oracle."""
    from tests.gguf_tools import test_llama_quantize_parity as parity

    tiny = parity.Tiny(tmp_path, "moe8")
    ref = tmp_path / "llama.gguf"
    parity.llama_quantize(tiny.bf16, ref, "Q4_K_M", parity.normalised(tiny.stats),
                          kv=parity.imatrix_kv(tiny.imatrix_path, tiny.imatrix))
    ours, _ = requantize(tiny.bf16, tmp_path / "ours.gguf", "Q4_K_M", imatrix=tiny.imatrix, threads=2)
    parity.assert_same_file(ours, ref)
    direct, _ = conv.convert(tiny.src, tmp_path / "direct.gguf", "Q4_K_M", arch=GEMMA4_ARCH, imatrix=tiny.imatrix,
                             threads=2)
    parity.assert_same_file(direct, ref)


def test_nan_in_a_worker_is_one_error_and_no_file(tiny_ckpt, tmp_path):
    src = tmp_path / "nan-ckpt"
    shutil.copytree(tiny_ckpt[0], src)
    t = next(t for shard in sorted(src.glob("*.safetensors")) for t in read_header(shard).values()
             if t.name.startswith("model.decoder.") and t.name.endswith("mlp.down_proj.weight"))
    with open(t.file, "r+b") as fh:
        fh.seek(t.offset + 2 * 5)
        fh.write(np.array([0x7FC0], dtype="<u2").tobytes())  # a bf16 NaN
    with pytest.raises(conv.ConversionError, match="contains NaN or Inf"):
        conv.convert(src, tmp_path / "out.gguf", "Q4_K_M", threads=2)
    assert not list(tmp_path.glob("*out.gguf*"))


def test_cli_threads(tiny_ckpt, tmp_path):
    import cli

    out = tmp_path / "t.gguf"
    result = CliRunner().invoke(cli.app, ["quantize", str(tiny_ckpt[0]), "--type", "Q4_K_M", "--threads", "0",
                                          "-o", str(out)])
    one_line_error(result, "--threads must be at least 1")
    assert not out.exists()
    result = CliRunner().invoke(cli.app, ["quantize", str(tiny_ckpt[0]), "--type", "Q6_K", "--threads", "2",
                                          "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == conv.convert(tiny_ckpt[0], tmp_path / "ref.gguf", "Q6_K")[0].read_bytes()


def test_one_job_stays_within_the_stated_memory(tmp_path):
    """The largest chunk (CHUNK_ELEMENTS values) of the hungriest quantizer (Q5_0 with an imatrix, per
    gguf_tools.parallel_quant) under tracemalloc: BF16 rows decoded to float32, checked, quantized."""
    row = 704
    n_rows = conv.CHUNK_ELEMENTS // row
    path = tmp_path / "big.gguf"
    w = GGUFWriter(path, "test")
    values = np.random.default_rng(0).standard_normal((n_rows, row), dtype=np.float32)
    w.add_tensor("w.weight", (values.view(np.uint32) >> 16).astype(np.uint16), raw_dtype=Q.BF16)  # decoded too
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(path, check_model=False)
    im = np.random.default_rng(1).gamma(0.7, 2.0, row).astype(np.float32)
    job = GGUFRows(Shared(f, _open_validated, str(path)), "w.weight", Q.Q5_0, 0, n_rows, im)
    tracemalloc.start()
    try:
        out = job()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (n_rows, row // 32 * 22)
    assert peak <= PEAK_PER_WORKER_MIB * 2**20, f"{peak / 2**20:.0f} MiB"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc for the worker processes")
def test_workers_end_with_a_killed_writer(tmp_path):
    """SIGKILL gives the writer no chance to shut its pool down; its workers must not linger."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    from gguf_tools.synthetic import tiny_config, write_checkpoint, write_tokenizer

    cfg, gen = tiny_config(512)
    cfg["text_config"].update(hidden_size=512, intermediate_size=1024, num_experts=8, moe_intermediate_size=256)
    src = tmp_path / "ckpt"
    write_checkpoint(src, cfg, gen, seed=0)
    write_tokenizer(src, 512)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "quantize", str(src), "-o",
                             str(tmp_path / "out.gguf"), "--type", "Q4_K_M", "--threads", "2"], cwd=repo,
                            env=dict(os.environ, PYTHONPATH=str(repo)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(children) < 2 and proc.poll() is None:
            with contextlib.suppress(OSError):
                children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            time.sleep(0.01)
        assert len(children) >= 2, "no worker processes seen"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{c}").exists() for c in children):
        time.sleep(0.05)
    alive = [c for c in children if Path(f"/proc/{c}").exists()]
    for c in alive:  # do not leave them behind when the test fails
        os.kill(c, signal.SIGKILL)
    assert not alive, f"worker processes {alive} outlived the writer"
