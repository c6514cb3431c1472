"""Loads the hand-written gold reports (tests/data/labels/gold_reports.jsonl) and scores an extractor."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GOLD_PATH = Path(__file__).parent / "data" / "labels" / "gold_reports.jsonl"

CODES = {
    "N": "normal",
    "DR": "diabetic_retinopathy",
    "AMD": "age_related_macular_degeneration",
    "GLC": "glaucoma",
    "RNFL": "rnfl_defect",
    "PM": "pathological_myopia",
    "TF": "tessellated_fundus",
    "RVO": "retinal_vein_occlusion",
    "RAO": "retinal_artery_occlusion",
    "HR": "hypertensive_retinopathy",
    "ME": "macular_edema",
    "CSC": "central_serous_chorioretinopathy",
    "ERM": "epiretinal_membrane",
    "MH": "macular_hole",
    "RD": "retinal_detachment",
    "ODE": "optic_disc_edema",
    "OA": "optic_atrophy",
    "MO": "media_opacity",
    "LS": "laser_scars",
}


@dataclass(frozen=True)
class GoldReport:
    id: str
    text: str
    eye: str | None
    positive: frozenset[str]
    uncertain: frozenset[str]
    negated: frozenset[str]


def _ids(field: str | None) -> frozenset[str]:
    return frozenset(CODES[c] for c in (field or "").split())


def load_gold() -> list[GoldReport]:
    out = []
    for line in GOLD_PATH.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        out.append(
            GoldReport(
                row["id"],
                row["text"],
                row.get("eye"),
                _ids(row.get("pos")),
                _ids(row.get("unc")),
                _ids(row.get("neg")),
            )
        )
    return out


def score(extractor, gold: list[GoldReport]) -> dict:
    """Micro-F1 over (report, label, state) for state in {positive, uncertain}; also negated and merged."""
    tp = fp = fn = 0
    ntp = nfp = nfn = 0
    mtp = mfp = mfn = 0
    errors = []
    for g in gold:
        got = extractor.extract(g.text, g.eye)
        pred = {(lab, "p") for lab in got.positive} | {(lab, "u") for lab in got.uncertain}
        true = {(lab, "p") for lab in g.positive} | {(lab, "u") for lab in g.uncertain}
        tp += len(pred & true)
        fp += len(pred - true)
        fn += len(true - pred)
        pm = set(got.positive) | set(got.uncertain)
        tm = set(g.positive) | set(g.uncertain)
        mtp += len(pm & tm)
        mfp += len(pm - tm)
        mfn += len(tm - pm)
        pn, tn = set(got.negated), set(g.negated)
        ntp += len(pn & tn)
        nfp += len(pn - tn)
        nfn += len(tn - pn)
        if pred != true or pn != tn:
            errors.append((g, got))

    def f1(a: int, b: int, c: int) -> float:
        return 2 * a / (2 * a + b + c) if a else 0.0

    return {
        "micro_f1": f1(tp, fp, fn),
        "micro_f1_merged": f1(mtp, mfp, mfn),
        "negated_f1": f1(ntp, nfp, nfn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "errors": errors,
    }
