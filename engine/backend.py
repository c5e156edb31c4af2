"""Which implementation runs the heavy operations: `--backend auto|torch|triton`.

`torch` is the reference (engine.model.TorchOps): dequantize with torch, multiply with torch.
`triton` is the fast path (engine.triton_ops.TritonOps): kernels that read the packed GGUF blocks
in place. `auto` takes triton on a CUDA device that can run it and torch everywhere else.

Triton also runs on CPU tensors under its interpreter (TRITON_INTERPRET=1, set before triton is
imported), slowly: that is how the kernels are tested without a GPU, so `--backend triton
--device cpu` is allowed exactly when the interpreter is on.

Resolution is a pure function (`resolve`) with the reason for its choice; `apply` acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class BackendChoice:
    requested: str
    name: str  # "torch" or "triton": what runs
    reason: str  # why, one line; for a refused triton request it names the fallback

    @property
    def fell_back(self) -> bool:
        return self.requested == "triton" and self.name != "triton"


def triton_problem(device: torch.device) -> str | None:
    """None when the triton kernels can run on `device`, else a one-line reason."""
    try:
        from engine.kernels import triton_available
    except ImportError as e:  # pragma: no cover - the kernel package itself is part of the project
        return f"the kernel package cannot be imported ({e})"
    return triton_available(device)


def resolve(requested: str, device: torch.device | str) -> BackendChoice:
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r} (choose from {', '.join(BACKENDS)})")
    device = torch.device(device)
    if requested == "torch":
        return BackendChoice(requested, "torch", "requested")
    problem = triton_problem(device)
    if requested == "auto":
        if device.type == "cuda" and problem is None:
            return BackendChoice(requested, "triton", f"auto: triton kernels on {device}")
        why = problem if device.type == "cuda" else f"auto: {device.type} device"
        return BackendChoice(requested, "torch", why)
    if problem is None:
        return BackendChoice(requested, "triton", "requested")
    return BackendChoice(requested, "torch", f"--backend triton is not available ({problem}); "
                                             "running with --backend torch")


def for_planning(requested: str) -> str:
    """The backend a plan is sized for: triton when asked for, or for auto when this machine's CUDA
    device would run it; a plan may be made for another machine, so triton is never refused here."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r} (choose from {', '.join(BACKENDS)})")
    if requested == "auto":
        return "triton" if torch.cuda.is_available() and triton_problem(torch.device("cuda")) is None else "torch"
    return requested


def apply(model, choice: BackendChoice) -> None:
    """Give `model` (engine.model.DiffusionGemmaModel) the operations `choice` names."""
    from engine.model import TorchOps

    if choice.name == "triton":
        from engine.triton_ops import TritonOps

        model.ops = TritonOps(model)
        if torch.device(model.device).type == "cuda":
            from engine.graph_step import StepGraphs

            model.step_graphs = StepGraphs(model)
    else:
        model.step_graphs = None
        model.ops = TorchOps(model)


def describe(model) -> dict:
    """For --json: the backend that ran and the tensors the fast path handed to torch."""
    ops = getattr(model, "ops", None)
    out = {"backend": getattr(ops, "name", "torch")}
    fallbacks = getattr(ops, "fallbacks", None)
    if fallbacks is not None:
        out["torch_fallback_tensors"] = sorted(fallbacks)
    return out


__all__ = ["BACKENDS", "BackendChoice", "apply", "describe", "for_planning", "resolve", "triton_problem"]
