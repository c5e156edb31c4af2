"""The crafted-file corpus (tests/security/corpus, made by make_corpus.py) through the command line.

Every bad file, through every command that reads it (`inspect`, `run` and `quantize` for GGUF files,
`quantize` on a checkpoint folder for safetensors shards and index files), must give a non-zero exit
and one `error:` line naming the problem, within a second, with bounded memory, and write nothing.
The measurements come from one separate process (cli_probe.py), so the pytest process's own
allocations neither hide nor inflate a case. Chat templates that reach for Python objects must run
with the safe template and leave no trace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CORPUS = HERE / "corpus"
MANIFEST: dict[str, dict[str, str]] = json.loads((CORPUS / "MANIFEST.json").read_text())
BAD_GGUF = sorted(k for k in MANIFEST if k.startswith("gguf/"))
BAD_CKPT = sorted(k for k in MANIFEST if k.startswith(("safetensors/", "index/")))
TEMPLATES = sorted(k for k in MANIFEST if k.startswith("template/"))

MAX_SECONDS = 1.0
MAX_TRACED = 32 << 20  # bytes of Python/NumPy memory one rejected file may cost
MAX_RSS_GROWTH = 128 << 20
RUN = ["--max-new-tokens", "4", "--steps", "2", "--device", "cpu"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # every job names its model; should one not, the default model is built in a scratch folder
    env.setdefault("DIFFGEMMA_CACHE", str(Path(tempfile.gettempdir()) / "diffgemma-security-cache"))
    return env


def _checkpoint(folder: Path, rel: str) -> Path:
    """config + tokenizer of the micro model, and the crafted shard or index."""
    shutil.copytree(CORPUS / "ckpt", folder)
    target = "model.safetensors" if rel.startswith("safetensors/") else "model.safetensors.index.json"
    shutil.copy(CORPUS / rel, folder / target)
    return folder


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Every (file, command) of the corpus, measured in one fresh process: {(rel, command): result}."""
    work = tmp_path_factory.mktemp("probe")
    out = work / "out"
    out.mkdir()
    jobs: list[list[str]] = [["inspect", str(CORPUS / "micro.gguf")]]  # also the warm-up
    keys: list[tuple[str, str]] = [("micro.gguf", "inspect")]
    for rel in BAD_GGUF:
        path = str(CORPUS / rel)
        name = Path(rel).stem
        for cmd, args in (("inspect", ["inspect", path]), ("run", ["run", path, "hi", *RUN]),
                          ("quantize", ["quantize", path, "-o", str(out / f"{name}.gguf"), "--type", "Q8_0"])):
            jobs.append(args)
            keys.append((rel, cmd))
    for rel in BAD_CKPT:
        folder = _checkpoint(work / "ckpt" / Path(rel).stem, rel)
        jobs.append(["quantize", str(folder), "-o", str(out / f"{folder.name}.gguf"), "--type", "BF16"])
        keys.append((rel, "quantize"))
    for rel in TEMPLATES:
        jobs.append(["--no-trace", "run", str(CORPUS / rel), "hi", *RUN, "--json"])
        keys.append((rel, "run"))
    jobs.append(["--no-trace", "run", str(CORPUS / "micro.gguf"), "hi", *RUN, "--json"])
    keys.append(("micro.gguf", "run"))
    jobs_file = work / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    cwd = work / "cwd"  # where a template payload would drop its PWNED file
    cwd.mkdir()
    proc = subprocess.run([sys.executable, str(HERE / "cli_probe.py"), str(jobs_file)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(jobs), proc.stderr[-3000:]
    by_key = dict(zip(keys, results))
    by_key[("", "cwd")] = {"files": sorted(p.name for p in cwd.iterdir())}
    by_key[("", "out")] = {"files": sorted(p.name for p in out.iterdir())}
    return by_key


def _check_rejected(r: dict, expect: str) -> None:
    assert r["exception"] is None, f"uncaught exception: {r['exception']}"
    assert r["exit_code"] == 1, r
    err = r["stderr"].strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in r["stderr"] + r["stdout"]
    assert expect in err, f"{expect!r} not in {err!r}"
    assert r["seconds"] < MAX_SECONDS, f"took {r['seconds']:.2f} s"
    assert r["peak_traced"] < MAX_TRACED, f"allocated {r['peak_traced'] / 2**20:.1f} MiB"
    assert r["maxrss_growth"] < MAX_RSS_GROWTH, f"resident set grew {r['maxrss_growth'] / 2**20:.1f} MiB"


@pytest.mark.parametrize("command", ["inspect", "run", "quantize"])
@pytest.mark.parametrize("rel", BAD_GGUF)
def test_bad_gguf_is_one_line_error(probe, rel, command):
    _check_rejected(probe[(rel, command)], MANIFEST[rel]["expect"])


@pytest.mark.parametrize("rel", BAD_CKPT)
def test_bad_checkpoint_is_one_line_error(probe, rel):
    _check_rejected(probe[(rel, "quantize")], MANIFEST[rel]["expect"])


def test_nothing_was_written(probe):
    assert probe[("", "out")]["files"] == []


def test_the_valid_micro_model_works(probe):
    assert probe[("micro.gguf", "inspect")]["exit_code"] == 0
    r = probe[("micro.gguf", "run")]
    assert r["exit_code"] == 0 and r["exception"] is None, r
    assert json.loads(r["stdout"])["token_ids"]


@pytest.mark.parametrize("rel", TEMPLATES)
def test_hostile_template_runs_with_the_safe_template(probe, rel):
    r = probe[(rel, "run")]
    assert r["exception"] is None and r["exit_code"] == 0, r
    result = json.loads(r["stdout"])
    assert result["token_ids"]
    # the prompt was the built-in layout: as many prompt tokens as the valid model's own template gives
    assert result["prompt_tokens"] == json.loads(probe[("micro.gguf", "run")]["stdout"])["prompt_tokens"]
    assert probe[("", "cwd")]["files"] == []  # no PWNED file
    assert r["seconds"] < 15


def test_templates_render_nothing_dangerous():
    """In-process: every payload renders exactly the built-in Gemma 4 layout (the file's template
    failed in the sandbox), and the sandbox's limits hold for the resource-exhaustion ones."""
    from engine.tokenizer import GGUFTokenizer, gemma4_chat
    from gguf_tools.reader import GGUFFile
    from tests.security.make_corpus import CVE_TEMPLATES

    msgs = [{"role": "user", "content": "hi"}]
    for rel in TEMPLATES:
        tok = GGUFTokenizer.from_kv(GGUFFile(CORPUS / rel).kv)
        assert tok.chat_template == CVE_TEMPLATES[Path(rel).stem]
        if "dos_time" in rel:
            continue  # ~1 s of rendering before the step limit; covered by the CLI run above
        text = tok.render_chat(msgs)
        assert text == gemma4_chat(msgs, bos="<bos>"), (rel, text[:200])
    assert not Path("PWNED").exists()


def test_real_entry_point_prints_one_line(tmp_path):
    """The installed command itself (typer's standalone mode), not the test runner: one line, exit 1."""
    bad = CORPUS / "gguf" / "offset_huge.gguf"
    proc = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "inspect", str(bad)], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ") and "offset" in proc.stderr
    assert proc.stdout == ""


# llama.cpp's own gguf reader (gguf_init_from_file, no_alloc) accepts these corpus files: it leaves the
# tensor-data bounds, the tensor table and the metadata to the model loader, does not check UTF-8 and
# allows n_dims 0 and empty names. We reject them earlier (the data bounds and the model checks are the
# loader's, UTF-8 is what gguf-py's reader would trip on, the rest is stricter on purpose).
LLAMA_ACCEPTS = {
    "data_cut", "data_missing", "array_string_not_utf8", "key_not_utf8", "value_not_utf8", "tensor_name_not_utf8",
    "key_reserved", "n_dims_zero", "tensor_name_empty",
} | {Path(k).stem for k in BAD_GGUF if Path(k).stem.startswith("model_")}


def test_llama_cpp_reader_agrees(tmp_path):
    """Every other structural forgery is rejected by llama.cpp's reader too (run in a child process:
    it is the oracle, not the code under test, and must not take pytest down with it)."""
    pytest.importorskip("llama_cpp")
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from tests.oracles.ggml_lib import lib, _InitParams\n"
        "out = {}\n"
        "for p in sorted(Path(sys.argv[1]).glob('*.gguf')):\n"
        "    ctx = lib().gguf_init_from_file(str(p).encode(), _InitParams(no_alloc=True, ctx=None))\n"
        "    out[p.stem] = bool(ctx)\n"
        "    if ctx: lib().gguf_free(ctx)\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(CORPUS / "gguf")], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    accepted = {k for k, ok in json.loads(proc.stdout.splitlines()[-1]).items() if ok}
    assert accepted == LLAMA_ACCEPTS
