"""The tool as a user installs it: a built wheel carries every module and data file the commands read,
and, installed into a fresh virtual environment and run from another folder, `--version`,
`quantize --type Q8_0` and the default `run` work without the source checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from engine.sort_task import Example, is_correct
from gguf_tools.package_data import data_dir

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("cli.py", "setup.py", "pyproject.toml", "README.md", "gguf_tools", "engine", "quant_presets", "models")


def repo_files(folder: str, pattern: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob(pattern)
            if "__pycache__" not in p.parts and p.is_file()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources (a build leaves build/ and *.egg-info behind)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (ROOT / name).is_dir() else {}))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("diffgemma-*.whl")
    return whl


def test_wheel_carries_every_module_preset_and_the_default_model(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = repo_files("gguf_tools", "*.py") | repo_files("engine", "*.py") | {"cli.py"}
    assert modules <= names, sorted(modules - names)
    presets = {f"gguf_tools/{p}" for p in repo_files("quant_presets", "*.toml")}
    model = {f"engine/{p}" for p in repo_files("models", "*")}
    assert len(presets) >= 17 and presets <= names, sorted(presets - names)
    assert any(p.endswith("model.safetensors") for p in model) and model <= names, sorted(model - names)
    assert not any(n.startswith(("quant_presets/", "models/")) for n in names)  # nothing at site-packages' top


def test_data_is_found_in_a_package_or_beside_it(tmp_path):
    pkg = tmp_path / "site" / "engine"
    (tmp_path / "site" / "models").mkdir(parents=True)
    pkg.mkdir()
    assert data_dir(pkg, "models") == tmp_path / "site" / "models"  # a source checkout, an editable install
    (pkg / "models").mkdir()
    assert data_dir(pkg, "models") == pkg / "models"  # an installed wheel


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh environment holding the wheel; the dependencies (torch, ...) come from this interpreter's."""
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env)], check=True,
                   timeout=120)
    py = env / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return env


def in_venv(env: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environ |= {"DIFFGEMMA_CACHE": str(cwd / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([str(env / "bin" / args[0]), *args[1:]], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=300)


def test_installed_wheel_quantizes_and_runs_from_another_folder(venv, tiny_ckpt, tmp_path):
    where = in_venv(venv, tmp_path, "python", "-c",
                    "import cli, engine.default_model as d, gguf_tools.presets as p; "
                    "print(cli.__file__); print(p.PRESET_DIR); print(d.SHIPPED)")
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(venv)) for line in where.stdout.split()), where.stdout  # not the checkout

    v = in_venv(venv, tmp_path, "diffgemma", "--version")
    assert v.returncode == 0 and v.stdout.strip() == f"diffgemma {version('diffgemma')}", v.stdout + v.stderr

    q = in_venv(venv, tmp_path, "diffgemma", "quantize", str(tiny_ckpt[0]), "--type", "Q8_0", "-o", "tiny-q8.gguf",
                "--threads", "1")
    assert q.returncode == 0, q.stderr
    assert (tmp_path / "tiny-q8.gguf").is_file() and "wrote tiny-q8.gguf" in q.stdout

    r = in_venv(venv, tmp_path, "diffgemma", "run", "Sort: 3 1 2", "--json", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert is_correct(Example((3, 1, 2)), json.loads(r.stdout)["text"])
    assert len(list((tmp_path / "cache").glob("diffgemma-sort-tiny-*.gguf"))) == 1
