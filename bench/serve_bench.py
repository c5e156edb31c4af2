"""Load benchmark of `diffgemma serve`: N concurrent clients x M requests against a real server.

    python bench/serve_bench.py                          # default model: 1, 4 and 16 clients x 200 requests
    python bench/serve_bench.py --clients 16 --requests 200
    python bench/serve_bench.py --full-width [--model FILE.gguf]   # synthetic 2-layer full-width model
    python bench/serve_bench.py --passes [--model FILE.gguf] [--batch 1,4,16]   # the batched pass alone

Default model: request i is a held-out sorting prompt asked through /v1/chat/completions with seed i
(the file's sampler settings and max_tokens). Before the server starts, the single-request answer of
every request is computed in this process the way `diffgemma run` computes it (engine.run's
loading, prompt ids and sampler keywords, engine.generate.generate on one sequence with a generator
seeded with i); each served answer's token ids (the response's `diffgemma.token_ids`) are compared
with it. Reported per client count: wall time, requests/s, output tok/s (completion tokens, i.e.
the answers' tokens before the end of turn), p50/p99 latency, errors, answers that differ.

--full-width: a synthetic DiffusionGemma with the real widths (hidden 2816, 128 experts top-8,
vocab 262144, 256-token canvas) and 2 layers, built with gguf_tools.synthetic and converted with
--type unless --model names one; one request alone, then 4 at once (raw /v1/completions, one canvas,
--steps denoising steps each): the wall time of the 4 over the wall time of the one.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT.parent / "shared" / "reference" / "diffusiongemma-26B-A4B-it"


class Server:
    """`diffgemma serve` in a child process on 127.0.0.1 and a free port; stopped with SIGTERM."""

    def __init__(self, model: Path | None, threads: int, max_batch: int, max_queue: int, ctx: int | None = None):
        cmd = [sys.executable, "-m", "cli", "serve", "--port", "0", "--threads", str(threads), "--max-batch",
               str(max_batch), "--max-queue", str(max_queue)] + ([str(model)] if model else [])
        cmd += ["--ctx", str(ctx)] if ctx else []
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.url = ""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise SystemExit(f"the server exited ({self.proc.wait()}) before listening")
            if "listening on" in line:
                self.url = line.split("listening on ")[1].split()[0]
                break
        else:
            self.stop()
            raise SystemExit("the server did not start within 600 s")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep its pipe drained

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Client:
    """One keep-alive HTTP connection (http.client: the client side adds as little as it can)."""

    def __init__(self, url: str, timeout: float = 3600):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)

    def post(self, path: str, body: dict) -> dict:
        self.conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
        return json.loads(data)


def post(url: str, path: str, body: dict) -> dict:
    return Client(url).post(path, body)


def load_clients(url: str, requests: list[dict], n_clients: int) -> tuple[float, list[dict | Exception], list[float]]:
    """Every client thread sends its share of the requests one after another."""
    results: list[dict | Exception] = [RuntimeError("not sent")] * len(requests)
    latency = [0.0] * len(requests)

    def client(k: int) -> None:
        c = Client(url)
        for i in range(k, len(requests), n_clients):
            t = time.perf_counter()
            try:
                results[i] = c.post("/v1/chat/completions", requests[i])
            except Exception as e:  # noqa: BLE001 - counted as an error
                results[i] = e
                c = Client(url)  # the connection may be broken
            latency[i] = time.perf_counter() - t

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t0, results, latency


def single_request_answers(prompts: list[str], threads: int) -> list[list[int]]:
    """What `diffgemma run PROMPT --seed i` generates for each prompt (engine.run's torch path)."""
    import torch

    from engine.generate import ModelRunner, generate
    from engine.run import load, prompt_ids, sampler_kwargs

    torch.set_num_threads(threads)
    lm = load(None, torch.device("cpu"))
    kw = sampler_kwargs(lm.model.spec)
    out = []
    for i, p in enumerate(prompts):
        ids = torch.tensor(prompt_ids(lm.tokenizer, p), dtype=torch.long)
        res = generate(ModelRunner(lm.model), ids, max_new_tokens=lm.model.spec.sampler.max_new_tokens,
                       generator=torch.Generator().manual_seed(i), **kw)
        out.append(res.tokens.tolist())
    return out


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def default_model_bench(args: argparse.Namespace) -> None:
    from engine.sort_task import evaluation_set

    examples = evaluation_set(args.requests)
    prompts = [e.prompt for e in examples]
    t = time.perf_counter()
    reference = single_request_answers(prompts, args.threads)
    print(f"single-request answers computed in-process in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    requests = [{"messages": [{"role": "user", "content": p}], "seed": i} for i, p in enumerate(prompts)]
    server = Server(None, args.threads, args.max_batch, max(args.clients) + 8)
    rows = []
    try:
        post(server.url, "/v1/chat/completions", requests[0])  # warm-up
        for n in args.clients:
            wall, results, latency = load_clients(server.url, requests, n)
            ok = [r for r in results if isinstance(r, dict)]
            errors = len(results) - len(ok)
            differ = sum(1 for r, ref in zip(results, reference)
                         if isinstance(r, dict) and r["diffgemma"]["token_ids"] != ref)
            correct = sum(1 for r, e in zip(results, examples)
                          if isinstance(r, dict) and r["choices"][0]["message"]["content"].strip() == e.answer)
            tokens = sum(r["usage"]["completion_tokens"] for r in ok)
            rows.append(dict(clients=n, requests=len(requests), wall_s=wall, req_s=len(requests) / wall,
                             tok_s=tokens / wall, p50=pct(latency, 0.5), p99=pct(latency, 0.99), errors=errors,
                             differ=differ, correct=correct))
            print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        code = server.stop()
    print(f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores; server --threads {args.threads} "
          f"--max-batch {args.max_batch}; default model, {args.requests} held-out sorting prompts, request i with "
          f"seed i; server exit status after SIGTERM: {code}\n")
    print("| clients | requests | wall s | requests/s | output tok/s | x 1 client | p50 s | p99 s | errors | "
          "differ from run | correct |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = next((r["tok_s"] for r in rows if r["clients"] == 1), None)
    for r in rows:
        rel = f"{r['tok_s'] / base:.2f}" if base else "-"
        print(f"| {r['clients']} | {r['requests']} | {r['wall_s']:.1f} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {rel} | "
              f"{r['p50']:.2f} | {r['p99']:.2f} | {r['errors']} | {r['differ']} | {r['correct']} |")


def full_width_model(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from gguf_tools.convert import convert
    from gguf_tools.synthetic import full_size_config, write_checkpoint, write_tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dg-serve-bench-"))
    out = work / f"diffusion-gemma-{args.layers}L-{args.type}.gguf"
    if out.is_file():
        return out
    src = work / f"synthetic-{args.layers}L"
    if not (src / "model.safetensors.index.json").is_file():
        cfg, gen = full_size_config(REFERENCE, args.layers)
        write_checkpoint(src, cfg, gen)
        write_tokenizer(src, cfg["text_config"]["vocab_size"])
    convert(src, out, args.type)
    return out


def full_width_bench(args: argparse.Namespace) -> None:
    model = full_width_model(args)
    body = {"prompt": "hello world, a short prompt", "max_tokens": 256, "steps": args.steps, "seed": 0}
    server = Server(model, args.threads, 4, 4, ctx=1024)
    try:
        t = time.perf_counter()
        one = post(server.url, "/v1/completions", body)
        t_one = time.perf_counter() - t
        out: list = [None] * 4

        def worker(i: int) -> None:
            out[i] = post(server.url, "/v1/completions", body | {"seed": i})

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        t_four = time.perf_counter() - t
    finally:
        code = server.stop()
    same = out[0]["diffgemma"]["token_ids"] == one["diffgemma"]["token_ids"]
    print(f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores; server --threads {args.threads}; "
          f"{model.name} ({args.layers} layers, full width); one 256-token canvas, {args.steps} steps per request; "
          f"server exit status {code}\n")
    print("| requests at once | wall s | x one request |")
    print("|---:|---:|---:|")
    print(f"| 1 | {t_one:.1f} | 1.00 |")
    print(f"| 4 | {t_four:.1f} | {t_four / t_one:.2f} |")
    print(f"\nseed 0 answered alone and within the 4: same tokens: {same}")


def pass_bench(args: argparse.Namespace) -> None:
    """The engine alone: one BatchedPass over B canvases against B decode_step calls (the one-sequence
    pass `run` makes), the outputs checked bit for bit."""
    import torch

    from engine.batch import BatchedPass, Segment
    from engine.run import load

    torch.set_num_threads(args.threads)
    m = load(Path(args.model) if args.model else None, torch.device("cpu"), need_tokenizer=False).model
    g = torch.Generator().manual_seed(0)
    cache = m.new_cache()
    m.encode(torch.randint(0, m.vocab, (16,), generator=g), cache)
    canvas = torch.randint(0, m.vocab, (m.canvas_length,), generator=g)
    _, soft = m.decode_step(canvas, cache, None, 0.8)

    def timed(fn):
        out, times = None, []
        for _ in range(args.reps):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return out, min(times)

    (logits, soft_next), t_one = timed(lambda: m.decode_step(canvas, cache, soft, 0.8))
    print(f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} threads; "
          f"{args.model or 'default model'}; {m.canvas_length}-token canvas with self-conditioning; "
          f"best of {args.reps}\n")
    print("| canvases | one pass s | decode_step s | pass / one step | canvases per step-time | bit-identical |")
    print("|---:|---:|---:|---:|---:|---|")
    bp = BatchedPass(m)
    for b in args.batch:
        outs, t_b = timed(lambda b=b: bp.run([Segment(cache, canvas, soft=soft, temperature=0.8)] * b))
        same = all(torch.equal(o.logits, logits) and torch.equal(o.soft, soft_next) for o in outs)
        print(f"| {b} | {t_b:.3f} | {t_one:.3f} | {t_b / t_one:.2f} | {b * t_one / t_b:.2f} | {same} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--full-width", action="store_true", help="the synthetic full-width model instead")
    ap.add_argument("--model", help="--full-width: an existing GGUF of it")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--type", default="Q8_0", help="--full-width: the type it is converted to")
    ap.add_argument("--steps", type=int, default=2, help="--full-width: denoising steps per request")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--passes", action="store_true",
                    help="time the engine's batched pass alone (default model, or --model) at --batch sizes")
    ap.add_argument("--batch", default="1,4,16", help="--passes: comma-separated canvas counts")
    ap.add_argument("--reps", type=int, default=5, help="--passes: best of this many")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.batch = [int(c) for c in args.batch.split(",")]
    if args.passes:
        pass_bench(args)
    elif args.full_width:
        full_width_bench(args)
    else:
        default_model_bench(args)


if __name__ == "__main__":
    main()
