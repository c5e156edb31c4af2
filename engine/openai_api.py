"""The OpenAI request and response shapes `diffgemma serve` speaks, checked field by field.

Requests are plain JSON objects; every field is either understood, mapped onto the diffusion
sampler, accepted only at the value that means "off" (with a message saying why otherwise), or
refused as unknown -- a misspelt option never silently does nothing. Mapping:

* `max_tokens` / `max_completion_tokens`: the answer's budget (default: the file's max_new_tokens,
  lowered to what fits the context); `seed`: the request's generator (default 0, as `run`);
* `temperature`: multiplies the file's temperature schedule (t_min and t_max; 1 = the file's);
  the sampler has no temperature 0 (there is no greedy mode to map it to), so 0 is refused;
* `stop`: up to 4 strings; the text is cut before the first one and the request ends there;
* `top_p` (1), `n` (1), `presence_penalty` / `frequency_penalty` (0), `logprobs` (false),
  `logit_bias` (empty), `echo` (false), `best_of` (1), `response_format` (text): accepted only at
  those values -- the entropy-bound sampler has no such control;
* extensions beside them: `steps`, `entropy_bound`, `t_min`, `t_max` (as `diffgemma run`'s
  options), `think` (chat: the template's thinking channel), `draft` (streaming: one chunk per
  denoising step carrying the current draft of the canvas in a `diffgemma` field).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["APIError", "GenParams", "chat_chunk", "chat_response", "completion_chunk", "completion_response",
           "error_body", "parse_request"]


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             405: "invalid_request_error", 429: "rate_limit_error",
                             503: "service_unavailable"}.get(status, "server_error")


def error_body(e: APIError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


@dataclass
class GenParams:
    kind: str  # "chat" or "completion"
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat
    prompt: str = ""  # completion
    model: str | None = None
    max_tokens: int | None = None
    seed: int = 0
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    temperature: float | None = None
    steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    think: bool = False
    draft: bool = False


COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
          "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user", "steps", "entropy_bound",
          "t_min", "t_max", "draft"}
CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs", "response_format", "think", "store", "metadata",
             "service_tier", "parallel_tool_calls", "tools", "tool_choice", "functions", "function_call",
             "reasoning_effort", "modalities", "audio", "prediction", "web_search_options"}
COMPLETION_ONLY = {"prompt", "echo", "suffix", "best_of"}
MAX_SEED = 2**63 - 1
MAX_STOPS = 4


def parse_request(body: Any, kind: str) -> GenParams:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    allowed = COMMON | (CHAT_ONLY if kind == "chat" else COMPLETION_ONLY)
    for name in body:
        if name not in allowed:
            raise APIError(400, f"unknown field {name!r}", name, "unknown_field")
    p = GenParams(kind)
    if kind == "chat":
        p.messages = _messages(body.get("messages"))
        p.think = _bool(body, "think", False)
        for name in ("tools", "functions"):
            if body.get(name):
                raise APIError(400, f"{name}: tool calling is not supported", name, "unsupported_value")
        for name in ("tool_choice", "function_call", "audio", "prediction", "web_search_options", "reasoning_effort"):
            if body.get(name) is not None:
                raise APIError(400, f"{name} is not supported", name, "unsupported_value")
        if body.get("modalities") not in (None, ["text"]):
            raise APIError(400, "modalities: only ['text'] is supported", "modalities", "unsupported_value")
        fmt = body.get("response_format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise APIError(400, "response_format: only {'type': 'text'} is supported", "response_format",
                           "unsupported_value")
        if body.get("top_logprobs") not in (None, 0):
            raise APIError(400, "top_logprobs: log probabilities are not available", "top_logprobs",
                           "unsupported_value")
        if body.get("logprobs") not in (None, False):
            raise APIError(400, "logprobs: log probabilities are not available", "logprobs", "unsupported_value")
        if "max_completion_tokens" in body and body.get("max_completion_tokens") is not None:
            p.max_tokens = _int(body, "max_completion_tokens", 1, None)
    else:
        p.prompt = _prompt(body.get("prompt"))
        if body.get("echo") not in (None, False):
            raise APIError(400, "echo is not supported", "echo", "unsupported_value")
        if body.get("suffix") not in (None, ""):
            raise APIError(400, "suffix is not supported (no fill-in-the-middle)", "suffix", "unsupported_value")
        if body.get("best_of") not in (None, 1):
            raise APIError(400, "best_of: only 1 is supported", "best_of", "unsupported_value")
        if body.get("logprobs") not in (None, 0, False):
            raise APIError(400, "logprobs: log probabilities are not available", "logprobs", "unsupported_value")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", "model")
    p.model = model
    if body.get("max_tokens") is not None:
        p.max_tokens = _int(body, "max_tokens", 1, None)
    p.seed = _int(body, "seed", 0, MAX_SEED) if body.get("seed") is not None else 0
    p.stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise APIError(400, "stream_options: only {'include_usage': bool} is understood", "stream_options")
        if not p.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        p.include_usage = _bool(opts, "include_usage", False, "stream_options.include_usage")
    p.stop = _stop(body.get("stop"))
    for name, off in (("top_p", 1), ("n", 1), ("presence_penalty", 0), ("frequency_penalty", 0)):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v != off):
            raise APIError(400, f"{name}: only {off} is supported (the entropy-bound sampler has no such control)",
                           name, "unsupported_value")
    if body.get("logit_bias"):
        raise APIError(400, "logit_bias is not supported", "logit_bias", "unsupported_value")
    if body.get("temperature") is not None:
        p.temperature = _num(body, "temperature", 0.0, 2.0)
        if p.temperature == 0:
            raise APIError(400, "temperature 0: the diffusion sampler needs a positive temperature schedule "
                                "(it scales the file's t_min/t_max; use seed for reproducible answers)",
                           "temperature", "unsupported_value")
    p.steps = _int(body, "steps", 1, 10_000) if body.get("steps") is not None else None
    p.entropy_bound = _num(body, "entropy_bound", 0.0, None) if body.get("entropy_bound") is not None else None
    if p.entropy_bound is not None and p.entropy_bound <= 0:
        raise APIError(400, "entropy_bound must be above 0", "entropy_bound")
    p.t_min = _num(body, "t_min", 0.0, None) if body.get("t_min") is not None else None
    p.t_max = _num(body, "t_max", 0.0, None) if body.get("t_max") is not None else None
    p.draft = _bool(body, "draft", False)
    if p.draft and not p.stream:
        raise APIError(400, "draft: the per-step drafts are sent as stream chunks; set stream: true", "draft")
    return p


def _int(body: dict, name: str, low: int, high: int | None) -> int:
    v = body.get(name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"{name} must be an integer, got {v!r}", name)
    if v < low or (high is not None and v > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise APIError(400, f"{name} {v}: must be {bound}", name)
    return v


def _num(body: dict, name: str, low: float, high: float | None) -> float:
    v = body.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise APIError(400, f"{name} must be a number, got {v!r}", name)
    if v < low or (high is not None and v > high):
        bound = f"at least {low:g}" if high is None else f"between {low:g} and {high:g}"
        raise APIError(400, f"{name} {v}: must be {bound}", name)
    return float(v)


def _bool(body: dict, name: str, default: bool, label: str | None = None) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"{label or name} must be true or false, got {v!r}", label or name)
    return v


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} strings", "stop")
    if any(s == "" for s in stops):
        raise APIError(400, "stop: empty strings are not allowed", "stop")
    return list(stops)


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list) or not v:
        raise APIError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", where)
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise APIError(400, f"{where}: unknown field {sorted(extra)[0]!r}", where, "unknown_field")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role {role!r}: use one of system, developer, user, assistant", where)
        out.append({"role": ROLES[role], "content": _content(m.get("content"), where)})
    return out


def _content(c: Any, where: str) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        texts = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}.content: only text parts are supported", where)
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"{where}.content must be a string or a list of text parts", where)


def _prompt(v: Any) -> str:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        return v[0]
    if not isinstance(v, str):
        raise APIError(400, "prompt must be a string (or a list holding one string)", "prompt")
    return v


# ---- responses --------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}], "usage": use}


def completion_response(rid: str, model: str, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": use}


def chat_chunk(rid: str, model: str, delta: dict[str, Any] | None, finish: str | None = None,
               use: dict[str, int] | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": choices}
    if use is not None:
        out["usage"] = use
    return out | extra


def completion_chunk(rid: str, model: str, text: str | None, finish: str | None = None,
                     use: dict[str, int] | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out | extra
