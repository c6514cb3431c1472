"""Checks every site reply before it can touch the global model.

One poisoned or broken update (NaN from a diverged site, a flipped sign, a model of the wrong shape,
something that is not model weights at all) would corrupt every hospital's model after averaging.
A reply is accepted only if it holds exactly the shared parameters of the current global model
(same names, shapes, dtypes), every value is finite, the update norm ||w_site - w_global|| is below
an absolute limit and not an outlier against the round's median, and its metrics are scalars.
Rejections are recorded with the reason; the round goes on with the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from server import protocol


@dataclass
class Verdict:
    ok: bool
    reason: str | None = None
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    update_norm: float | None = None
    arrays: ArrayRecord | None = None


def reply_structure(msg: Message) -> dict:
    """A description of everything a reply carries (record kinds, array shapes, metric types),
    without values: what the wire audit log stores."""
    if msg.has_error():
        return {"error": True, "error_code": int(msg.error.code), "reason_len": len(msg.error.reason or "")}
    out: dict = {"error": False, "records": {}}
    for key, rec in msg.content.items():
        if isinstance(rec, ArrayRecord):
            out["records"][key] = {
                "type": "ArrayRecord",
                "arrays": {
                    k: {"shape": list(a.shape), "dtype": str(a.dtype), "nbytes": len(a.data)}
                    for k, a in rec.items()
                },
            }
        elif isinstance(rec, MetricRecord):
            out["records"][key] = {
                "type": "MetricRecord",
                "metrics": {
                    k: type(v).__name__ if not isinstance(v, list) else f"list[{len(v)}]"
                    for k, v in rec.items()
                },
            }
        elif isinstance(rec, ConfigRecord):
            out["records"][key] = {
                "type": "ConfigRecord",
                "values": {
                    k: (
                        f"str[{len(v)}]"
                        if isinstance(v, str)
                        else f"bytes[{len(v)}]"
                        if isinstance(v, bytes)
                        else type(v).__name__
                    )
                    for k, v in rec.items()
                },
            }
        else:  # pragma: no cover - future record kinds
            out["records"][key] = {"type": type(rec).__name__}
    return out


def payload_bytes(rec: ArrayRecord) -> int:
    return int(sum(len(a.data) for a in rec.values()))


def structural_check(
    msg: Message, global_arrays: dict[str, np.ndarray], spec: protocol.ParamSpec | None = None
) -> Verdict:
    """Shape, kind and finiteness of one reply; the norm is computed but judged by `judge_norms`.
    With the parameter `spec` of packed replies, a bad value is reported by parameter name."""
    content = msg.content
    array_records = list(content.array_records.items())
    metric_records = list(content.metric_records.items())
    if len(content.config_records):
        return Verdict(
            False, "reply carries a ConfigRecord; only model arrays and scalar metrics are accepted"
        )
    if len(array_records) != 1 or len(metric_records) != 1 or len(content) != 2:
        return Verdict(
            False, f"reply must hold one ArrayRecord and one MetricRecord, got {sorted(content.keys())}"
        )
    _, arrays = array_records[0]
    _, metrics = metric_records[0]
    names = set(arrays.keys())
    expected = set(global_arrays)
    if names != expected:
        extra = sorted(names - expected)[:3]
        missing = sorted(expected - names)[:3]
        return Verdict(
            False, f"arrays differ from the shared model parameters (unexpected {extra}, missing {missing})"
        )
    sq = 0.0
    for k, g in global_arrays.items():
        a = arrays[k]
        if tuple(a.shape) != tuple(g.shape) or str(a.dtype) != str(g.dtype):
            return Verdict(
                False, f"array {k} has shape {tuple(a.shape)}/{a.dtype}, expected {tuple(g.shape)}/{g.dtype}"
            )
        x = a.numpy()
        finite = np.isfinite(x)
        if not finite.all():
            where = k
            if spec is not None and k.startswith(protocol.PACKED_PREFIX):
                where = protocol.locate(spec, k, int(np.flatnonzero(~finite.ravel())[0]))
            return Verdict(False, f"update contains NaN or Inf values (parameter {where})")
        d = x.astype(np.float64) - g.astype(np.float64)
        sq += float(np.dot(d.ravel(), d.ravel()))
    vals: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, list) or len(k) > protocol.MAX_METRIC_NAME:
            return Verdict(False, f"metric {k[:40]!r} is not a scalar metric of this protocol")
        vals[k] = float(v)
    n = vals.get(protocol.NUM_EXAMPLES)
    if n is None or not math.isfinite(n) or n <= 0 or n != int(n):
        return Verdict(False, f"metric {protocol.NUM_EXAMPLES} must be a positive integer, got {n}")
    return Verdict(True, None, int(n), vals, math.sqrt(sq), arrays)


def judge_norms(verdicts: list[Verdict], max_update_norm: float, max_norm_ratio: float) -> None:
    """Reject updates whose norm is absurd: above the absolute limit, or an outlier against the
    median of the round's updates (needs >= 3 updates for the median to mean anything)."""
    for v in verdicts:
        if v.ok and v.update_norm is not None and v.update_norm > max_update_norm:
            v.ok, v.reason = (
                False,
                f"update norm {v.update_norm:.4g} exceeds safety.max_update_norm {max_update_norm:.4g}",
            )
    norms = [v.update_norm for v in verdicts if v.ok and v.update_norm is not None]
    if len(norms) >= 3:
        med = float(np.median(norms))
        limit = max_norm_ratio * max(med, 1e-12)
        for v in verdicts:
            if v.ok and v.update_norm is not None and v.update_norm > limit:
                v.ok, v.reason = (
                    False,
                    (
                        f"update norm {v.update_norm:.4g} is more than {max_norm_ratio:g}x "
                        f"the round median {med:.4g}"
                    ),
                )
