"""`quantize --target SIZE`: a GGML type per tensor, chosen by measured sensitivity, under a size budget.

Loss model. Quantizing weight W to Ŵ changes a layer's output by (W - Ŵ) x; with the importance
matrix (the mean of x_j^2 per input column, per expert for expert weights) the expected squared change
is sum_j imatrix_j * ||W[:, j] - Ŵ[:, j]||^2. Divided by the output's own expected energy
(the same sum with W) it is the tensor's relative error rel(t, q), measured by actually quantizing the
tensor (gguf_tools.quant_error: a sample of its rows for large tensors; the byte-exact quantizers the
file is written with). Experts are weighted by how many rows the imatrix saw for each. The canvas KLD a
tensor's error causes is modelled as gain(t) * rel(t, q): gains are measured with KLD probes
(engine.sensitivity: the model's canvas KLD with that one tensor quantized, divided by its rel) when
they are given, else taken per role from ROLE_GAINS, probes of the built-in model.

Allocation. Minimise the sum of gain * rel over tensors with the total under the budget: a
multiple-choice knapsack, solved by dynamic programming over the budget in 50,000 steps, then made
exact (rounding repaired, leftover bytes spent).

Only types llama.cpp runs are candidates (quant_error.CANDIDATES), each where its block divides the row: the 704
and 2112-wide rows get the 32-value block types.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from .imatrix import Imatrix
from .parallel_quant import Shared
from .presets import PresetError, Rule, allows_quantization, load_preset, tensor_bytes
from .quant_error import candidates, measure, read_checkpoint_rows, read_gguf_rows

ALIGNMENT = 32

# KLD per unit of relative error by tensor role: `engine.sensitivity` probes of the built-in model with its
# diffusion imatrix, geometric mean over its layers (`python bench/quality_table.py --calibrate`). The
# built-in model's down projections (rows of 272 and 176) take no 32-value block, so they cannot be
# probed there: they borrow the gain of the projections that feed them (marked "as").
ROLE_GAINS: dict[str, float] = {
    "attn_k": 3.222e-04,
    "attn_output": 2.928e-04,
    "attn_q": 1.962e-05,
    "attn_v": 1.138e-04,
    "ffn_gate": 1.272e-05,
    "ffn_gate_up_exps": 4.492e-06,
    "ffn_up": 3.298e-06,
    "self_cond_gate": 4.250e-07,
    "self_cond_up": 4.635e-07,
    "token_embd": 1.181e-03,
    "ffn_down": 6.477e-06,  # as ffn_gate and ffn_up (geometric mean)
    "ffn_down_exps": 4.492e-06,  # as ffn_gate_up_exps
    "ffn_gate_exps": 4.492e-06,  # split gate/up files: as ffn_gate_up_exps
    "ffn_up_exps": 4.492e-06,
    "self_cond_down": 4.439e-07,  # as self_cond_gate and self_cond_up
    "output": 1.181e-03,  # an untied output head: as token_embd, the tied one
}
DEFAULT_GAIN = float(np.exp(np.mean(np.log(list(ROLE_GAINS.values())))))  # any other role

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class TargetError(ValueError):
    """A --target that cannot be met or read; the message says why."""


@dataclass(frozen=True)
class Target:
    # "bytes": the whole file; "bpw": bits per weight over all tensors; "vram": a card to fit (turned into
    # "weights", the bytes of tensor data, by engine.sensitivity.weights_budget)
    kind: str
    value: float
    text: str

    def describe(self) -> str:
        return self.text


def parse_target(text: str) -> Target:
    """'18GB' (10^9), '16.5GiB' (2^30), '512MiB', '4.8bpw', or 'vram:24GB' (binary, as `plan` reads
    card sizes). File sizes follow the download-page convention: GB is 10^9 bytes, GiB 2^30."""
    t = str(text).strip()
    vram = t.lower().startswith("vram:")
    body = t[5:].strip() if vram else t
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)", body)
    if m is None:
        raise TargetError(f"--target {text!r}: expected a size (18GB, 16.5GiB), bits per weight (4.8bpw) or "
                          "vram:SIZE")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value) or value <= 0:
        raise TargetError(f"--target {text!r}: must be above 0")
    if vram:
        binary = {"": None, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
                  "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
        if binary.get(unit) is None:
            raise TargetError(f"--target {text!r}: a VRAM budget needs a unit (vram:24GB)")
        return Target("vram", value * binary[unit], t)
    if unit == "bpw":
        return Target("bpw", value, t)
    if unit not in _UNITS:
        raise TargetError(f"--target {text!r}: unknown unit {unit or '(none)'!r} (use GB, GiB, MB, MiB or bpw)")
    return Target("bytes", value * _UNITS[unit], t)


def padded(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def role(name: str) -> str:
    """blk.7.attn_q.weight -> attn_q."""
    return re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight")


# ---- allocation ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    qtype: Q
    cost: int  # bytes counted against the budget
    loss: float  # expected KLD


@dataclass
class Choice:
    name: str
    option: Option
    options: list[Option]
    gain: float
    rel: float
    why: str = ""


@dataclass
class Mix:
    target: Target
    budget: int
    choices: dict[str, Choice]
    fixed: dict[str, Q] = field(default_factory=dict)  # tensors not chosen here (never quantized, --tensor-type)
    used: int = 0
    smallest: int = 0
    largest: int = 0
    cutoff: float = 0.0  # the best KLD saving per byte that did not fit
    stock_kld: float = float("nan")  # the same loss model for the --type preset's own types
    planned_bpw: float = 0.0  # bits per weight over all tensors, unpadded (as `inspect` counts them)

    @property
    def expected_kld(self) -> float:
        return sum(c.option.loss for c in self.choices.values())

    def types(self) -> dict[str, Q]:
        return {n: c.option.qtype for n, c in self.choices.items()}

    def rules(self) -> tuple[Rule, ...]:
        """--tensor-type overrides that make the plan write this mix."""
        return tuple(Rule("^" + re.escape(n) + "$", q) for n, q in self.types().items())


def allocate(options: Mapping[str, list[Option]], budget: int, buckets: int = 50_000
             ) -> tuple[dict[str, Option], float]:
    """Minimise the summed loss with the summed cost <= budget (a multiple-choice knapsack): dynamic
    programming over the budget in at most `buckets` steps (exact when the costs are whole steps), then,
    with exact costs, the cheapest-loss downgrades until it fits and the best upgrades that still fit.
    Returns the choice and the best KLD saving per byte left out. Raises TargetError when even the
    smallest options do not fit."""
    names = list(options)
    smallest = sum(min(o.cost for o in options[n]) for n in names)
    if smallest > budget:
        raise TargetError(f"needs at least {smallest} bytes of tensors, the budget leaves {budget}")
    unit = max(1, -(-budget // buckets))
    top = budget // unit
    dp = np.zeros(top + 1)
    choice = np.empty((len(names), top + 1), dtype=np.int16)
    for k, n in enumerate(names):
        new = np.full(top + 1, np.inf)
        arg = np.zeros(top + 1, dtype=np.int16)
        for i, o in enumerate(options[n]):
            c = o.cost // unit  # rounded down: every mix that fits exactly fits here too
            if c > top:
                continue
            cand = np.full(top + 1, np.inf)
            cand[c:] = dp[:top + 1 - c] + o.loss
            better = cand < new
            new[better], arg[better] = cand[better], i
        dp, choice[k] = new, arg
    pick: dict[str, Option] = {}
    b = top
    for k in range(len(names) - 1, -1, -1):
        o = options[names[k]][int(choice[k, b])]
        pick[names[k]] = o
        b -= o.cost // unit
    used = sum(o.cost for o in pick.values())
    while used > budget:  # rounding: give back bytes where they cost the least loss
        best = None
        for n in names:
            for o in options[n]:
                if o.cost < pick[n].cost:
                    ratio = (o.loss - pick[n].loss) / (pick[n].cost - o.cost)
                    if best is None or ratio < best[0]:
                        best = (ratio, n, o)
        assert best is not None
        used += best[2].cost - pick[best[1]].cost
        pick[best[1]] = best[2]
    while True:  # and spend what is left on the best saving that still fits
        best = None
        for n in names:
            for o in options[n]:
                extra = o.cost - pick[n].cost
                if o.loss < pick[n].loss and used + extra <= budget and (best is None or
                                                                         pick[n].loss - o.loss > best[0]):
                    best = (pick[n].loss - o.loss, n, o, extra)
        if best is None:
            break
        pick[best[1]], used = best[2], used + best[3]
    left_out = [(pick[n].loss - o.loss) / (o.cost - pick[n].cost) for n in names for o in options[n]
                if o.cost > pick[n].cost and o.loss < pick[n].loss]
    return pick, max(left_out, default=0.0)


# ---- the mix for a plan ----------------------------------------------------------------------------

@dataclass
class _Budget:
    free: list  # PlannedTensors chosen here
    fixed: dict[str, Q]
    fixed_cost: int
    budget: int
    head: int
    n_elements: int
    bpw: bool

    def cost(self, q: Q, shape: tuple[int, ...]) -> int:
        n = tensor_bytes(q, shape)
        return n if self.bpw else padded(n)


def _budget(plan, target: Target, free_names: Iterable[str], header_bytes: int,
            fixed: Mapping[str, Q] | None) -> _Budget:
    """What the chosen tensors may spend, and the bounds: checked from the shapes alone, so a target that
    cannot be met is refused before any weight is read."""
    fixed = dict(fixed or {})
    names = set(free_names) - set(fixed)
    free = [t for t in plan.tensors if t.name in names]
    for t in plan.tensors:
        if t.name not in names and allows_quantization(t.name, t.shape) and t.name not in fixed:
            fixed[t.name] = t.qtype
    bpw = target.kind == "bpw"
    n_elements = sum(int(np.prod(t.shape)) for t in plan.tensors)
    b = _Budget(free, fixed, 0, 0, 0 if bpw or target.kind == "weights" else padded(header_bytes), n_elements, bpw)
    b.fixed_cost = sum(b.cost(fixed.get(t.name, t.qtype), t.shape) for t in plan.tensors if t.name not in names)
    if bpw:
        b.budget = int(target.value * n_elements / 8) - b.fixed_cost
    else:  # "weights" (tensor data only, a VRAM budget: engine.sensitivity) has no header
        b.budget = int(target.value) - b.head - b.fixed_cost
    smallest = sum(min(b.cost(q, t.shape) for q in candidates(t.shape)) for t in free)
    largest = sum(b.cost(Q.BF16, t.shape) for t in free)
    if b.budget < smallest:
        raise TargetError(f"--target {target.text} is smaller than the smallest mix of this model "
                          f"({_show(smallest + b.fixed_cost + b.head, bpw, n_elements)})")
    if b.budget > largest:
        raise TargetError(f"--target {target.text} is larger than the BF16 file "
                          f"({_show(largest + b.fixed_cost + b.head, bpw, n_elements)}); use --type BF16")
    return b


def check_target(plan, target: Target, free_names: Iterable[str], header_bytes: int,
                 fixed: Mapping[str, Q] | None = None) -> None:
    _budget(plan, target, free_names, header_bytes, fixed)


def choose_mix(plan, target: Target, rel: Mapping[str, Mapping[Q, float]], *, header_bytes: int,
               gains: Mapping[str, float] | None = None, fixed: Mapping[str, Q] | None = None) -> Mix:
    """The mix for `plan` (a ConversionPlan: names, shapes, source types) under `target`. `rel`: the
    measured relative errors of every chosen-here tensor; `fixed`: tensors whose type is given."""
    b = _budget(plan, target, rel, header_bytes, fixed)
    gains = dict(gains or {})
    options, gain_of = {}, {}
    for t in b.free:
        g = gains.get(t.name, ROLE_GAINS.get(role(t.name), DEFAULT_GAIN))
        gain_of[t.name] = g
        options[t.name] = [Option(q, b.cost(q, t.shape), g * r) for q, r in rel[t.name].items()]
    smallest = sum(min(o.cost for o in opts) for opts in options.values())
    largest = sum(b.cost(Q.BF16, t.shape) for t in b.free)
    pick, cutoff = allocate(options, b.budget)
    choices = {}
    for t in b.free:
        o = pick[t.name]
        choices[t.name] = Choice(t.name, o, options[t.name], gain_of[t.name], rel[t.name][o.qtype],
                                 _why(o, options[t.name], cutoff))
    used = sum(o.cost for o in pick.values()) + b.fixed_cost + b.head
    raw = sum(tensor_bytes(pick[t.name].qtype if t.name in pick else b.fixed.get(t.name, t.qtype), t.shape)
              for t in plan.tensors)
    extra = b.fixed_cost + b.head
    return Mix(target, b.budget, choices, b.fixed, used, smallest + extra, largest + extra, cutoff,
               planned_bpw=8 * raw / b.n_elements)


def _show(n: int, bpw: bool, n_elements: int) -> str:
    return f"{8 * n / n_elements:.3f} bpw" if bpw else f"{n / 2**20:.2f} MiB, {n} bytes"


def _why(o: Option, options: list[Option], cutoff: float) -> str:
    up = [x for x in options if x.cost > o.cost and x.loss < o.loss]
    if not up:
        return "best candidate"
    nxt = min(up, key=lambda x: x.cost)
    saving = (o.loss - nxt.loss) / max(1, nxt.cost - o.cost)
    return f"next {nxt.qtype.name}: {saving:.2e} KLD/byte (best left out: {cutoff:.2e})"


def target_plan(src: Path | str, type_name: str, target: Target, imatrix: Imatrix | None, *,
                overrides: tuple[Rule, ...] = (), gains: Mapping[str, float] | None = None, threads: int = 1,
                on_tensor: Callable[[int, int], None] | None = None):
    """(the plan of `src` with --type type_name, the mix for `target`). Reads the weights (a sample of
    rows per tensor); tensors an override matches keep the override's type."""
    from .convert import Checkpoint, header_size, prepare
    from .requantize import _open_validated, plan_requantize

    if load_preset(type_name).is_float:
        raise PresetError(f"--target needs a quantized --type for the file's defaults, not {type_name}")
    src = Path(src)
    if src.is_file():
        base, f = plan_requantize(src, type_name, overrides, imatrix=imatrix)
        source, read = Shared(f, _open_validated, str(f.path)), read_gguf_rows
        src_name = {t.name: t.name for t in base.tensors}
    else:
        base, ckpt = prepare(src, type_name, overrides=overrides, imatrix=imatrix)
        source, read = Shared(ckpt, Checkpoint, ckpt.folder), read_checkpoint_rows
        src_name = {t.name: t.source for t in base.tensors}
    fixed = {t.name: t.qtype for t in base.tensors if any(r.matches(t.name) for r in overrides)}
    free = [(t.name, src_name[t.name], t.shape) for t in base.tensors
            if allows_quantization(t.name, t.shape) and t.name not in fixed and src_name[t.name] is not None]
    header = header_size(base)
    check_target(base, target, [n for n, _, _ in free], header, fixed)  # before any weight is read
    rel = measure(free, source, read, imatrix, threads, on_tensor=on_tensor)
    mix = choose_mix(base, target, rel, header_bytes=header, gains=gains, fixed=fixed)
    mix.stock_kld = sum(c.gain * rel[n].get(t.qtype, float("nan")) for t in base.tensors
                        for n, c in [(t.name, mix.choices.get(t.name))] if c is not None)
    return base, mix


# ---- presets ---------------------------------------------------------------------------------------

def save_preset(mix: Mix, path: Path, base_type: str, command: str = "") -> Path:
    """A preset TOML that `--type FILE.toml` reads back: one exact-name rule per chosen tensor."""
    from .atomic import atomic_path

    base = load_preset(base_type)
    if base.is_float:
        raise PresetError(f"--target needs a quantized --type, not {base.name}")
    counts: dict[Q, int] = {}
    for c in mix.choices.values():
        counts[c.option.qtype] = counts.get(c.option.qtype, 0) + c.option.cost
    default = max(counts, key=counts.get) if counts else base.default
    lines = [f"# made by diffgemma quantize --target {mix.target.text}" + (f" ({command})" if command else ""),
             f"# expected canvas KLD {mix.expected_kld:.6f} (sum of gain x measured relative error)",
             f'name = "{path.stem}"', f"file_type = {base.file_type}", f'default = "{default.name}"',
             f'description = "--target {mix.target.text} mix"', ""]
    for name, c in mix.choices.items():
        lines += ["[[rules]]", f"pattern = '^{re.escape(name)}$'", f'type = "{c.option.qtype.name}"', ""]
    with atomic_path(Path(path)) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return Path(path)


def explain(mix: Mix) -> list[dict[str, object]]:
    return [{"name": c.name, "type": c.option.qtype.name, "bytes": c.option.cost, "rel_error": c.rel,
             "gain": c.gain, "kld": c.option.loss, "why": c.why} for c in mix.choices.values()]


def summary(mix: Mix) -> dict[str, object]:
    by_type: dict[str, int] = {}
    for c in mix.choices.values():
        by_type[c.option.qtype.name] = by_type.get(c.option.qtype.name, 0) + c.option.cost
    return {"target": mix.target.text, "budget_bytes": mix.budget, "planned_bytes": mix.used,
            "planned_bpw": mix.planned_bpw,
            "smallest_bytes": mix.smallest, "bf16_bytes": mix.largest, "expected_kld": mix.expected_kld,
            "stock_expected_kld": mix.stock_kld, "cutoff_kld_per_byte": mix.cutoff, "bytes_by_type": by_type}


__all__ = ["ROLE_GAINS", "Mix", "Option", "Target", "TargetError", "allocate", "check_target", "choose_mix",
           "explain", "parse_target", "save_preset", "summary", "target_plan"]
