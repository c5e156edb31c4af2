"""`diffgemma serve` end to end: a real server on 127.0.0.1 and a free port, the `openai` client for
the happy paths, raw HTTP for the errors. Oracle for the answers: `diffgemma run --seed S --json`.

Every server is a child process stopped in a finally (SIGTERM, then SIGKILL); every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cli_helpers import invoke

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key"
START_S = 180  # a cold start converts the built-in model first
WAIT_S = 120


class ServerProcess:
    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", "0", "--threads", "1", *args],
                                     cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        deadline = time.monotonic() + START_S
        self.url = None
        try:
            while time.monotonic() < deadline and self.url is None:
                line = self.proc.stderr.readline()
                if not line:
                    raise AssertionError(f"server exited early: {''.join(self.log)}")
                self.log.append(line)
                if "listening on " in line:
                    self.url = line.split("listening on ")[1].split()[0]
            assert self.url, "server did not start"
        except BaseException:
            self.stop()
            raise
        self.host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self._drain = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
        self._drain.start()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def client(self, key: str | None = KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=WAIT_S)

    def request(self, method: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=WAIT_S)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        out = r.status, r.read()
        conn.close()
        return out[0], json.loads(out[1]) if out[1] else None

    def health(self) -> dict:
        return self.request("GET", "/health", key=None)[1]

    def wait_for(self, cond, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if cond(self.health()):
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {self.health()}")


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-batch", "4", "--max-queue", "16", "--ctx", "512", "--api-key", KEY)
    try:
        yield s
    finally:
        assert s.stop() == 0, "".join(s.log)


def run_json(*args: str) -> dict:
    r = invoke("run", *args, "--json", "--threads", "1")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


PROMPTS = ["Sort: 7 3 9 1 4", "Sort: 5 2 8", "Sort: 6 0 4 1 9 3", "Sort: 2 7 5"]


def test_concurrent_chat_answers_equal_run_for_their_seeds(server):
    client = server.client()

    def ask(i: int):
        return client.chat.completions.create(model="any", messages=[{"role": "user", "content": PROMPTS[i % 4]}],
                                              seed=i)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for i, a in enumerate(answers):
        ref = run_json(PROMPTS[i % 4], "--seed", str(i))
        assert a.model_extra["diffgemma"]["token_ids"] == ref["token_ids"]
        assert a.model_extra["diffgemma"]["steps_per_canvas"] == ref["steps_per_canvas"]
        assert a.choices[0].message.content == ref["text"]
        assert a.choices[0].finish_reason == ("stop" if ref["finished"] else "length")
        assert a.usage.prompt_tokens == ref["prompt_tokens"]
        assert a.usage.completion_tokens == ref["answer_tokens"]
        assert a.object == "chat.completion" and a.id.startswith("chatcmpl-")


def test_streaming_sends_the_same_answer_canvas_by_canvas(server):
    client = server.client()
    messages = [{"role": "user", "content": PROMPTS[2]}]
    whole = client.chat.completions.create(model="any", messages=messages, seed=11, max_tokens=40)
    stream = client.chat.completions.create(model="any", messages=messages, seed=11, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"draft": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    drafts = [c.model_extra["diffgemma"] for c in chunks if "diffgemma" in (c.model_extra or {})]
    assert len(drafts) == sum(whole.model_extra["diffgemma"]["steps_per_canvas"])
    assert drafts[0]["step"] == 1 and drafts[0]["canvas"] == 0


def test_completions_are_raw_prompts_like_run_raw(server):
    a = server.client().completions.create(model="any", prompt="Sort: 3 1 2", seed=4, max_tokens=24)
    ref = run_json("Sort: 3 1 2", "--raw", "--seed", "4", "--max-new-tokens", "24")
    assert a.model_extra["diffgemma"]["token_ids"] == ref["token_ids"]
    assert a.choices[0].text == ref["text"]
    chunks = list(server.client().completions.create(model="any", prompt="Sort: 3 1 2", seed=4, max_tokens=24,
                                                     stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref["text"]


def test_stop_strings_cut_the_answer(server):
    a = server.client().chat.completions.create(model="any", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                seed=0, stop=[" 7"])
    ref = run_json(PROMPTS[0], "--seed", "0")["text"]
    assert " 7" in ref
    assert a.choices[0].message.content == ref[:ref.index(" 7")]
    assert a.choices[0].finish_reason == "stop"


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.health()["model"]]
    h = server.health()
    assert h["status"] == "ok" and h["max_batch"] == 4 and h["ctx"] == 512


LONG = "Sort: " + " ".join(["1 2 3 4 5 6 7 8 9 0"] * 60)
ERRORS = [
    ("POST", "/v1/chat/completions", None, b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/chat/completions", [1, 2], None, 400, "JSON object"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, None, 400,
     "unknown field 'bogus'"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, None,
     400, "max_tokens -1"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, None,
     400, "exceed the context of 512"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, None, 400,
     "context of 512 tokens"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, None,
     400, "must be an integer"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0.5}, None, 400,
     "top_p"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}, None, 400,
     "temperature 0"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, None, 400, "n: "),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, None, 400, "role"),
    ("POST", "/v1/chat/completions", {"messages": []}, None, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "t_min": 5.0}, None, 400,
     "t_min"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "think": True}, None, 400,
     "thinking channel"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "draft": True}, None, 400,
     "stream"),
    ("POST", "/v1/completions", {"prompt": "hi", "echo": True}, None, 400, "echo"),
    ("POST", "/v1/completions", {"prompt": 7}, None, 400, "prompt"),
    ("GET", "/v1/nothing", None, None, 404, "Not Found"),
    ("GET", "/v1/chat/completions", None, None, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("method, path, body, raw, status, needle", ERRORS,
                         ids=[f"{e[4]}-{i}" for i, e in enumerate(ERRORS)])
def test_bad_requests_get_openai_error_bodies(server, method, path, body, raw, status, needle):
    got, data = server.request(method, path, body, raw=raw)
    assert got == status, data
    assert set(data) == {"error"} and {"message", "type", "param", "code"} <= set(data["error"])
    assert needle in data["error"]["message"], data


def test_a_port_in_use_is_one_line_before_loading(tmp_path):
    import socket

    from tests.cli_helpers import one_line_error

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        one_line_error(invoke("serve", str(tmp_path / "none.gguf"), "--port", str(port)), f"127.0.0.1:{port}")


def test_api_key(server):
    body = {"messages": [{"role": "user", "content": "hi"}]}
    for key in (None, "wrong"):
        status, data = server.request("POST", "/v1/chat/completions", body, key=key)
        assert status == 401 and data["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert server.request("GET", "/health", key=None)[0] == 200  # health needs no key


# a request that runs for minutes unless stopped: the canvas never settles (one token accepted per
# step at a temperature far too high to be confident) and may take 10,000 steps
ENDLESS = {"messages": [{"role": "user", "content": "Sort: 4 2"}], "max_tokens": 12, "steps": 10_000,
           "t_min": 50.0, "t_max": 50.0, "entropy_bound": 1e-9}


def open_stream(s: ServerProcess, body: dict) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(s.host, s.port, timeout=WAIT_S)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body | {"stream": True}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: ")  # the first chunk: the request runs
    conn.r = r  # keep the response (and its socket) alive
    return conn


def test_full_queue_is_429_and_a_gone_client_frees_its_slot():
    s = ServerProcess("--max-batch", "1", "--max-queue", "1")
    conns: list[http.client.HTTPConnection] = []
    try:
        first = open_stream(s, ENDLESS)
        conns.append(first)
        s.wait_for(lambda h: h["running"] == 1, "the first request to run")
        second = http.client.HTTPConnection(s.host, s.port, timeout=WAIT_S)
        conns.append(second)
        second.request("POST", "/v1/chat/completions", body=json.dumps(ENDLESS),
                       headers={"Content-Type": "application/json"})
        s.wait_for(lambda h: h["queued"] == 1, "the second request to wait")
        status, data = s.request("POST", "/v1/chat/completions", ENDLESS)
        assert status == 429 and data["error"]["code"] == "queue_full"
        first.r.close()
        first.close()  # the client goes away mid-stream
        s.wait_for(lambda h: h["running"] == 1 and h["queued"] == 0, "the waiting request to take the slot")
        second.close()  # and the other one, waiting for its whole answer
        s.wait_for(lambda h: h["running"] == 0 and h["queued"] == 0, "the slot to be freed")
        a = s.client(None).chat.completions.create(model="any", messages=[{"role": "user", "content": PROMPTS[1]}],
                                                   seed=2)
        assert a.model_extra["diffgemma"]["token_ids"] == run_json(PROMPTS[1], "--seed", "2")["token_ids"]
    finally:
        for c in conns:  # an endless request left open would hold the graceful shutdown
            c.close()
        assert s.stop() == 0, "".join(s.log)


def test_sigterm_finishes_running_requests_refuses_waiting_ones_and_exits_0():
    s = ServerProcess("--max-batch", "1", "--max-queue", "4")
    try:
        slow = ENDLESS | {"steps": 120}
        results: dict[str, tuple] = {}
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, s.request("POST",
                                                                                      "/v1/chat/completions", slow)))
                   for k in ("running", "waiting")]
        threads[0].start()
        s.wait_for(lambda h: h["running"] == 1, "the first request to run")
        threads[1].start()
        s.wait_for(lambda h: h["queued"] == 1, "the second request to wait")
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(WAIT_S)
        status, data = results["running"]
        assert status == 200 and data["diffgemma"]["steps_per_canvas"] == [120]
        status, data = results["waiting"]
        assert status == 503 and "shutting down" in data["error"]["message"]
        assert s.proc.wait(WAIT_S) == 0
    finally:
        s.stop()


def test_a_failing_request_does_not_take_the_server_down(restore_threads):
    """In-process server (so that one request can be made to fail inside the engine: its prompt
    ids leave the vocabulary); the requests beside it are answered as run answers them."""
    import uvicorn

    from engine.server import ServeOptions, _listen, create_app, open_service

    service = open_service(ServeOptions(threads=1, max_batch=4))
    real = service.prompt_ids
    service.prompt_ids = lambda p: [2, 10**6] if "FAIL" in p.prompt else real(p)
    sock = _listen("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(create_app(service), log_level="critical", lifespan="off"))
    service.scheduler.start()
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=WAIT_S)

        def ask(prompt: str):
            try:
                return client.completions.create(model="any", prompt=prompt, seed=1, max_tokens=12)
            except openai.APIStatusError as e:
                return e

        with ThreadPoolExecutor(3) as pool:
            good1, bad, good2 = pool.map(ask, ["Sort: 8 1", "FAIL", "Sort: 3 9 4"])
        assert isinstance(bad, openai.InternalServerError) and "generation failed" in str(bad)
        for a, prompt in ((good1, "Sort: 8 1"), (good2, "Sort: 3 9 4")):
            ref = run_json(prompt, "--raw", "--seed", "1", "--max-new-tokens", "12")
            assert a.model_extra["diffgemma"]["token_ids"] == ref["token_ids"]
        after = client.completions.create(model="any", prompt="Sort: 2 1", max_tokens=12)
        assert after.choices[0].finish_reason in ("stop", "length")  # still serving
    finally:
        srv.should_exit = True
        th.join(WAIT_S)
        service.scheduler.close(WAIT_S)
        sock.close()


@pytest.fixture
def restore_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
