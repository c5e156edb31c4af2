"""Run many `diffgemma` invocations in one fresh process and measure each one.

    python -m tests.security.cli_probe JOBS.json  ->  one JSON object per job on stdout

JOBS.json is a list of argument lists (a leading "--no-trace" skips tracemalloc for that job: it
slows torch-heavy runs several times and they are not what the memory bound is about). The
process imports everything once and warms up with the first job, so each measurement is the
command's own work: wall time, the peak of Python-tracked memory (tracemalloc: NumPy and torch CPU
buffers included) and the growth of the process's peak resident set (ru_maxrss). Used by
test_corpus.py; kept separate from the pytest process so that what other tests allocated never
hides (or is blamed on) a case.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import tracemalloc


def main(jobs_file: str) -> None:
    from typer.testing import CliRunner

    import cli
    import engine.run  # noqa: F401  (imported here, not inside the first measured `run`)
    import gguf_tools.convert  # noqa: F401
    import gguf_tools.requantize  # noqa: F401

    with open(jobs_file, encoding="utf-8") as fh:
        jobs = json.loads(fh.read())
    # typer rebuilds the click command on every invoke (most of a rejected file's 40 ms); build it once
    import typer.main
    import typer.testing

    command = typer.main.get_command(cli.app)
    typer.testing._get_command = lambda app: command
    runner = CliRunner()
    if jobs:
        runner.invoke(cli.app, [a for a in jobs[0] if a != "--no-trace"])  # warm-up: lazy imports inside the commands
    for args in jobs:
        trace = args[:1] != ["--no-trace"]
        args = args if trace else args[1:]
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if trace:
            tracemalloc.start()
        t0 = time.perf_counter()
        result = runner.invoke(cli.app, args)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] if trace else None
        tracemalloc.stop()
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        exc = result.exception
        print(json.dumps({
            "args": args, "exit_code": result.exit_code, "stderr": result.stderr, "stdout": result.stdout[-2000:],
            "seconds": seconds, "peak_traced": peak, "maxrss_growth": (rss1 - rss0) * 1024,
            "exception": None if exc is None or isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}",
        }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
