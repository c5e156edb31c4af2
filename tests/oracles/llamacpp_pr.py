"""llama.cpp as of pull request #24423 (the code that made the community diffusion-gemma GGUFs), as an oracle.

The pinned source and its `build.sh` live in ../shared/oracles/llama-cpp-pr24423/ beside the checkout. This
module finds the built tools in a cache folder outside the repository (the shared folder may be read-only),
builds them once when they are missing, and runs them:

- `llama-diffusion-gemma-eval`: the decoder's canvas logits [C, V] after a prompt (optionally with
  self-conditioning, optionally through its prefill-then-decode path, DG_CACHED=1);
- `llama-diffusion-cli`: the PR's entropy-bound diffusion runner;
- `llama-quantize`: the PR's quantizer, to make files the way the community made theirs.

    python -m tests.oracles.llamacpp_pr build     # build if missing; prints the bin folder (CI, benchmarks)
    python -m tests.oracles.llamacpp_pr where     # print the bin folder, or exit 1 if not built

Test-only third-party code (MIT): nothing of it is copied into the project.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SOURCE = Path(os.environ.get("DIFFGEMMA_LLAMACPP_SRC") or REPO.parent / "shared" / "oracles" / "llama-cpp-pr24423")
PREFIX = Path(os.environ.get("DIFFGEMMA_LLAMACPP_PR") or Path.home() / ".cache" / "diffgemma" / "llama-pr24423")
TARGETS = ("llama-diffusion-gemma-eval", "llama-diffusion-cli", "llama-quantize")
# the first build takes about 7 minutes on 2 cores; no test run should wait on a hung compiler for ever
BUILD_TIMEOUT_S = 3600
RUN_TIMEOUT_S = 300


class OracleUnavailable(RuntimeError):
    """The oracle cannot be found or built here; the message says why (tests skip with it)."""


class OracleFailed(RuntimeError):
    """An oracle tool ran and failed; the message carries the end of its stderr."""


def find_bin(prefix: Path = PREFIX, targets: Sequence[str] = TARGETS) -> Path | None:
    """The bin folder when every target is built there, else None."""
    bin_dir = prefix / "build" / "bin"
    return bin_dir if all(os.access(bin_dir / t, os.X_OK) for t in targets) else None


def build(prefix: Path = PREFIX, targets: Sequence[str] = TARGETS, quiet: bool = True) -> Path:
    """Build the missing targets with the pinned build.sh (serialised by a lock file, so two test
    processes never compile at once); returns the bin folder."""
    found = find_bin(prefix, targets)
    if found is not None:
        return found
    script = SOURCE / "build.sh"
    if not script.is_file():
        raise OracleUnavailable(f"llama.cpp PR #24423 source not found at {SOURCE} (set DIFFGEMMA_LLAMACPP_SRC)")
    missing = [t for t in ("cmake", "ninja", "g++") if shutil.which(t) is None]
    if missing:
        raise OracleUnavailable(f"cannot build the llama.cpp PR #24423 oracle: {', '.join(missing)} not installed "
                                f"(apt-get install cmake ninja-build g++)")
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix.parent / f".{prefix.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = find_bin(prefix, targets)  # another process may have built it while we waited
        if found is not None:
            return found
        env = {**os.environ, "TARGETS": " ".join(targets)}
        out = subprocess.DEVNULL if quiet else None
        try:
            p = subprocess.run(["bash", str(script), str(prefix)], env=env, stdout=out, stderr=subprocess.PIPE,
                               text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise OracleUnavailable(f"building the llama.cpp oracle took over {BUILD_TIMEOUT_S} s") from None
        if p.returncode != 0:
            raise OracleUnavailable(f"building the llama.cpp oracle failed: {p.stderr.strip()[-800:]}")
    found = find_bin(prefix, targets)
    if found is None:
        raise OracleUnavailable(f"build.sh finished but {prefix / 'build' / 'bin'} lacks {', '.join(targets)}")
    return found


def oracle_bin(build_if_missing: bool = True) -> Path:
    """The bin folder; builds it when missing unless DIFFGEMMA_NO_ORACLE_BUILD=1 or `build_if_missing` is False."""
    found = find_bin()
    if found is not None:
        return found
    if not build_if_missing or os.environ.get("DIFFGEMMA_NO_ORACLE_BUILD") == "1":
        raise OracleUnavailable(f"llama.cpp PR #24423 oracle not built in {PREFIX} "
                                f"(python -m tests.oracles.llamacpp_pr build)")
    return build()


def _run(cmd: list[str], env: dict[str, str] | None = None,
         timeout: int = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    # errors="replace": a random model's canvas can end inside a multi-byte character
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env={**os.environ, **(env or {})},
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise OracleFailed(f"{Path(cmd[0]).name} exited with {p.returncode}: {p.stderr.strip()[-1500:]}")
    return p


def canvas_logits(bin_dir: Path, model: Path, prompt: Sequence[int], canvas: Sequence[int],
                  prev_logits: np.ndarray | None = None, cached: bool = False) -> np.ndarray:
    """llama.cpp's decoder logits [C, V] (float32) for `canvas` after `prompt`.

    prev_logits [C, V]: the previous step's (temperature-scaled) logits; self-conditioning is on when given
    (the tool softmaxes them, as our engine does). cached: prefill the prompt into its KV store, then decode
    the canvas from it (DG_CACHED=1) instead of one unified [prompt | canvas] forward."""
    with tempfile.TemporaryDirectory(prefix="dg-oracle-") as tmp:
        t = Path(tmp)
        np.asarray(prompt, dtype="<i4").tofile(t / "prompt.i32")
        np.asarray(canvas, dtype="<i4").tofile(t / "canvas.i32")
        cmd = [str(bin_dir / "llama-diffusion-gemma-eval"), str(model), str(t / "prompt.i32"),
               str(t / "canvas.i32"), str(t / "out.f32")]
        if prev_logits is not None:
            np.ascontiguousarray(prev_logits, dtype="<f4").tofile(t / "prev.f32")
            cmd.append(str(t / "prev.f32"))
        _run(cmd, env={"DG_CACHED": "1" if cached else "0"})
        out = np.fromfile(t / "out.f32", dtype="<f4")
    return out.reshape(len(canvas), -1)


def diffusion_cli(bin_dir: Path, model: Path, prompt: str, n_predict: int, threads: int = 2, seed: int = 0,
                  extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """One generation with llama-diffusion-cli (the file's diffusion.eb_* sampler settings)."""
    return _run([str(bin_dir / "llama-diffusion-cli"), "-m", str(model), "-p", prompt, "-n", str(n_predict),
                 "-t", str(threads), "--seed", str(seed), *extra])


def llama_quantize(bin_dir: Path, src: Path, dst: Path, type_name: str, threads: int = 2,
                   extra: Sequence[str] = ()) -> Path:
    """The PR's llama-quantize: SRC (F32/F16/BF16 GGUF) -> DST of preset `type_name`."""
    _run([str(bin_dir / "llama-quantize"), *extra, str(src), str(dst), type_name, str(threads)])
    return dst


def main(argv: Sequence[str]) -> int:
    cmd = argv[0] if argv else "build"
    try:
        if cmd == "build":
            print(build(quiet=False))
        elif cmd == "where":
            print(oracle_bin(build_if_missing=False))
        else:
            print("usage: python -m tests.oracles.llamacpp_pr [build|where]", file=sys.stderr)
            return 2
    except OracleUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
