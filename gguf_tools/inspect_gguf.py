"""A GGUF file summarised: architecture, key/values, tensors, and bytes and bits per weight by type."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .reader import GGUFFile

ARRAY_PREVIEW = 8  # elements of a long array shown in the key/value table


def summarize(f: GGUFFile) -> dict[str, Any]:
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "elements": 0, "bytes": 0})
    tensors = []
    for t in f.tensors.values():
        row = by_type[t.qtype.name]
        row["tensors"] += 1
        row["elements"] += t.n_elements
        row["bytes"] += t.n_bytes
        tensors.append({"name": t.name, "type": t.qtype.name, "shape": list(t.shape), "bytes": t.n_bytes})
    total_bytes = sum(r["bytes"] for r in by_type.values())
    total_elems = sum(r["elements"] for r in by_type.values())
    types = [{"type": k, **v, "bpw": 8 * v["bytes"] / max(v["elements"], 1)} for k, v in sorted(by_type.items())]
    return {
        "path": str(f.path),
        "architecture": f.architecture,
        "file_size": f.path.stat().st_size,
        "kv": [{"key": k, "type": f.kv_types[k], "value": _preview(v)} for k, v in f.kv.items()],
        "tensors": tensors,
        "types": types,
        "tensor_count": len(tensors),
        "total_bytes": total_bytes,
        "bpw": 8 * total_bytes / max(total_elems, 1),
    }


def _preview(v: Any) -> Any:
    if isinstance(v, list) and len(v) > ARRAY_PREVIEW:
        return {"length": len(v), "head": v[:ARRAY_PREVIEW]}
    if isinstance(v, str) and len(v) > 200:
        return v[:200] + f"... ({len(v)} chars)"
    return v
