"""Evaluation reports: a JSON file for machines and one self-contained HTML page for people.

The HTML page must open anywhere, including on an air-gapped hospital workstation, so it loads
nothing: styles are inline and the ROC curves are matplotlib PNGs embedded as base64 data URIs. It
holds only aggregate numbers and curves (no images, no identifiers, no report text), so it can be
shared with the consortium.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from vilref_fed.eval.metrics import roc_curve


def _finite(x: Any) -> Any:
    """JSON has no NaN: missing metrics become null."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (np.floating,)):
        return _finite(float(x))
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


def json_ready(result: dict[str, Any]) -> dict[str, Any]:
    """The result without numpy arrays, with NaN as null."""
    return _finite({k: v for k, v in result.items() if not isinstance(v, np.ndarray)})


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def roc_figure_png(y_true: np.ndarray, scores: np.ndarray, label_ids: Sequence[str], per_label: dict) -> str:
    """Small multiples of the ROC curve of every evaluated label, as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = [
        (j, x)
        for j, x in enumerate(label_ids)
        if per_label[x]["auc"] is not None
        and not (isinstance(per_label[x]["auc"], float) and math.isnan(per_label[x]["auc"]))
    ]
    n = max(len(labels), 1)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    for ax, (j, label) in zip(axes.ravel(), labels, strict=False):
        ax.set_visible(True)
        fpr, tpr, _ = roc_curve(y_true[:, j], scores[:, j])
        ax.plot(fpr, tpr, color="#1f5fa8", lw=1.8)
        ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.set_title(
            f"{label}\nAUC {per_label[label]['auc']:.3f} (n+={per_label[label]['n_positive']})", fontsize=8
        )
        ax.tick_params(labelsize=7)
        ax.set_xlabel("1 - specificity", fontsize=7)
        ax.set_ylabel("sensitivity", fontsize=7)
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


def auc_bar_png(label_ids: Sequence[str], per_label: dict) -> str:
    """Per-label AUC as a horizontal bar chart (0.5 = chance), as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = [x for x in label_ids if per_label[x]["auc"] is not None and not math.isnan(per_label[x]["auc"])]
    vals = [per_label[x]["auc"] for x in names]
    fig, ax = plt.subplots(figsize=(7.5, 0.28 * max(len(names), 1) + 0.8))
    colors = ["#2e7d32" if v >= 0.75 else "#f9a825" if v >= 0.6 else "#c62828" for v in vals]
    ax.barh(range(len(names)), vals, color=colors)
    ax.axvline(0.5, color="#555555", lw=0.8, ls="--")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("ROC AUC", fontsize=8)
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1c1c1c;max-width:1100px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:13px} .cards{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:120px}
.card .v{font-size:22px;font-weight:600} .card .k{font-size:12px;color:#555}
table{border-collapse:collapse;font-size:13px}
th,td{padding:4px 10px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f5f5f5}
td.na{color:#aaa} img{max-width:100%} .note{font-size:12px;color:#555;max-width:900px}
"""


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def build_html(
    result: dict[str, Any],
    title: str,
    y_true: np.ndarray | None,
    scores: np.ndarray | None,
    settings: dict[str, Any] | None = None,
) -> str:
    """The self-contained page: summary cards, per-label table, AUC bars and ROC curves (embedded PNGs)."""
    label_ids = list(result.get("label_ids") or result["per_label"].keys())
    per = result["per_label"]
    cards = [
        ("macro AUC", result.get("macro_auc")),
        ("macro AP", result.get("macro_ap")),
        ("macro F1", result.get("macro_f1")),
        ("macro balanced acc.", result.get("macro_balanced_accuracy")),
        ("labels evaluated", result.get("n_labels_evaluated")),
        ("images", result.get("n_samples")),
    ]
    rows = []
    for x in label_ids:
        p = per[x]
        cells = "".join(
            f"<td class='{'na' if _fmt(p.get(k)) == 'n/a' else ''}'>{_fmt(p.get(k))}</td>"
            for k in ("n_positive", "n_negative", "auc", "ap", "f1", "balanced_accuracy", "threshold")
        )
        rows.append(f"<tr><td>{html.escape(x)}</td>{cells}</tr>")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<div class='meta'>generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}</div>",
    ]
    if settings:
        meta = " · ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in settings.items())
        parts.append(f"<div class='meta'>{meta}</div>")
    parts.append("<div class='cards'>")
    parts += [
        f"<div class='card'><div class='v'>{_fmt(v)}</div><div class='k'>{k}</div></div>" for k, v in cards
    ]
    parts.append("</div>")
    parts.append(
        "<h2>Per-label results</h2><table><tr><th>label</th><th>positives</th><th>negatives</th>"
        "<th>AUC</th><th>AP</th><th>F1</th><th>balanced acc.</th><th>threshold</th></tr>"
    )
    parts += rows
    parts.append("</table>")
    parts.append(
        "<p class='note'>AUC and AP are threshold-free; F1 and balanced accuracy use the threshold "
        "shown. Labels without positives (or without negatives) in this set have no AUC and are "
        "left out of the macro averages.</p>"
    )
    if y_true is not None and scores is not None and result.get("n_labels_evaluated"):
        parts.append("<h2>AUC per label</h2>")
        parts.append(f"<img alt='AUC per label' src='data:image/png;base64,{auc_bar_png(label_ids, per)}'>")
        parts.append("<h2>ROC curves</h2>")
        png = roc_figure_png(y_true, scores, label_ids, per)
        parts.append(f"<img alt='ROC curves' src='data:image/png;base64,{png}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_eval_report(
    out_dir: Path | str,
    result: dict[str, Any],
    title: str = "vilref-fed evaluation",
    settings: dict[str, Any] | None = None,
    stem: str = "report",
) -> tuple[Path, Path]:
    """Write out_dir/<stem>.json and out_dir/<stem>.html; `result` may carry "y_true"/"scores" arrays.

    Returns (json_path, html_path). Both are written atomically (temp file, then rename).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = json_ready(result)
    if settings:
        data["settings"] = _finite(dict(settings))
    y, s = result.get("y_true"), result.get("scores")
    page = build_html(
        data,
        title,
        y if isinstance(y, np.ndarray) else None,
        s if isinstance(s, np.ndarray) else None,
        settings,
    )
    json_path, html_path = out / f"{stem}.json", out / f"{stem}.html"
    for path, text in ((json_path, json.dumps(data, indent=2, ensure_ascii=False) + "\n"), (html_path, page)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return json_path, html_path
