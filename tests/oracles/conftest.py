"""Fixtures for the llama.cpp PR #24423 oracle tests: the built tools, the subject checkpoints, and the files
`diffgemma quantize` writes from them (made once per session and shared between tests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.oracles import oracle_models
from tests.oracles.llamacpp_pr import OracleUnavailable, oracle_bin


@pytest.fixture(scope="session")
def llamacpp_bin() -> Path:
    """The PR's tools; built on first use (about 7 minutes on 2 cores) unless DIFFGEMMA_NO_ORACLE_BUILD=1."""
    try:
        return oracle_bin()
    except OracleUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def subject_ckpt(tmp_path_factory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("oracle-ckpt")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = oracle_models.checkpoint(name, root)
        return made[name]

    return get


def make_imatrix(path: Path, reference_gguf: Path) -> Path:
    """A random but strongly uneven importance matrix for every blk.* matrix of the model (llama.cpp's
    GGUF imatrix format), so that quantizing with it differs from quantizing without it."""
    from gguf_tools.imatrix import needs_imatrix_entry, save_gguf_imatrix
    from gguf_tools.reader import GGUFFile

    rng = np.random.default_rng(5)
    stats = {}
    for name, t in GGUFFile(reference_gguf).tensors.items():
        if needs_imatrix_entry(name) and len(t.shape) >= 2 and "ffn_gate_inp" not in name:
            n_mat = t.shape[0] if len(t.shape) == 3 else 1
            counts = rng.integers(50, 900, n_mat).astype(np.float32)
            sums = rng.gamma(0.5, 3.0, (n_mat, t.shape[-1])).astype(np.float32) * counts[:, None]
            stats[name] = (sums, counts)
    return save_gguf_imatrix(path, stats)


@pytest.fixture(scope="session")
def our_file(subject_ckpt, tmp_path_factory) -> Callable[..., Path]:
    """our_file(subject, TYPE, *quantize options) -> the GGUF `diffgemma quantize` writes (cached).
    `src="BF16"` requantizes our BF16 file instead of converting the checkpoint; `src=PATH` requantizes PATH."""
    from tests.cli_helpers import invoke

    root = tmp_path_factory.mktemp("oracle-gguf")
    made: dict[tuple, Path] = {}

    def get(subject: str, type_name: str, *options: str, src: str | Path | None = None, imatrix: bool = False) -> Path:
        key = (subject, type_name, options, src, imatrix)
        if key in made:
            return made[key]
        source = subject_ckpt(subject) if src is None else src if isinstance(src, Path) else get(subject, src)
        extra = list(options)
        if imatrix:
            extra += ["--imatrix", str(make_imatrix(root / f"{subject}-imatrix.gguf", get(subject, "F32")))]
        out = root / f"{subject}-{type_name}-{len(made)}.gguf"
        result = invoke("quantize", source, "--type", type_name, "-o", out, *extra)
        assert result.exit_code == 0, result.output
        made[key] = out
        return out

    return get
