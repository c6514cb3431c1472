"""The screening report: one self-contained HTML page a clinician can open from a USB stick.

Self-contained (inline CSS, plots as base64 PNG, no script, no external request) because hospital
workstations are often offline and block remote content. It shows what a reader needs to trust or
distrust the run — how many images were read and rejected, where each label's operating point came
from, how scores are distributed around it — and the studies to look at first. It never contains a
patient name, ID, accession number or file path: studies appear by their keyed hash only, and image
thumbnails are included only when the operator asks for them (they are patient images).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

MAX_TOP_ROWS = 25


def render_histograms_png(
    scores: np.ndarray,
    label_ids: Sequence[str],
    label_names: Mapping[str, str],
    thresholds: Mapping[str, float],
) -> bytes:
    """Small multiples: one histogram of screening probabilities per label, its threshold as a red line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(label_ids)
    cols = 4 if n > 4 else max(n, 1)
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(3.2 * cols, 2.2 * rows), dpi=90)
    FigureCanvasAgg(fig)
    bins = np.linspace(0.0, 1.0, 26)
    for i, label in enumerate(label_ids):
        ax = fig.add_subplot(rows, cols, i + 1)
        col = scores[:, i] if scores.size else np.zeros(0)
        counts, _ = np.histogram(col, bins=bins)
        # One filled step artist per panel (not 25 bar patches): the page is built in well under a second.
        ax.stairs(counts, bins, fill=True, color="#4c78a8")
        t = thresholds.get(label)
        if t is not None:
            ax.axvline(t, color="#d62728", linestyle="--", linewidth=1.2)
        # A plain text title and fixed, sparse ticks: matplotlib's automatic tick and title layout
        # otherwise costs more than the rest of the screening report together.
        ax.text(0.5, 1.03, label_names.get(label, label), transform=ax.transAxes, ha="center", fontsize=8)
        top = max(1, int(counts.max(initial=0)))
        ax.set_xlim(0, 1)
        ax.set_ylim(0, top * 1.1)
        ax.set_xticks([0.0, 0.5, 1.0])
        ax.set_yticks([0, top])
        ax.tick_params(labelsize=6)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.06, top=0.95, wspace=0.25, hspace=0.55)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def thumbnail_jpeg(rgb: np.ndarray, size: int = 160) -> bytes:
    """A small JPEG of a canonical fundus image, for the (opt-in) thumbnails column."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb)).convert("RGB")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 24px; color: #1d1d1f;
       max-width: 1200px; }
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 13px; }
.note { background: #fff7e0; border: 1px solid #f0d48a; padding: 8px 12px; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin-top: 8px; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; text-align: left; vertical-align: middle; }
th { background: #f2f4f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.flag { display: inline-block; background: #fde2e1; color: #8a1c15; border-radius: 3px;
        padding: 1px 5px; margin: 1px; font-size: 12px; }
.key { font-family: Menlo, Consolas, monospace; font-size: 12px; }
img.thumb { width: 120px; height: 120px; object-fit: cover; border-radius: 4px; }
img.hist { max-width: 100%; }
"""


def build_report_html(
    summary: Mapping,
    label_ids: Sequence[str],
    label_names: Mapping[str, str],
    scores: np.ndarray,
    top_rows: Sequence[Mapping],
    thumbnails: Mapping[str, bytes] | None = None,
) -> str:
    """The page as a string. `top_rows` are results rows (most abnormal first) with keys `study_key`,
    `image_key`, `laterality`, `abnormality`, `flagged` (label ids); `thumbnails` maps image_key to JPEG.
    """
    thresholds = summary.get("thresholds", {})
    sources = summary.get("threshold_sources", {})
    counts = summary.get("counts", {})
    per_label = summary.get("per_label", {})
    model = summary.get("model", {})
    parts: list[str] = []
    add = parts.append
    add("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>")
    add("<meta name='viewport' content='width=device-width, initial-scale=1'>")
    add("<title>Fundus screening report</title><style>" + _CSS + "</style></head><body>")
    add("<h1>Fundus screening report (zero-shot)</h1>")
    add(
        "<div class='meta'>"
        f"Generated {_esc(summary.get('created', ''))} &middot; model <b>{_esc(model.get('name', '?'))}</b>"
        f" &middot; prompts in <b>{_esc(summary.get('language', '?'))}</b>"
        f" &middot; ontology {_esc(str(model.get('ontology_hash', ''))[:12])}"
        f" &middot; device {_esc(summary.get('device', '?'))}</div>"
    )
    add(
        "<p class='note'>Decision support only. Scores come from a vision-language model compared with "
        "text descriptions of each finding (zero-shot); they are not a diagnosis. Studies are listed by a "
        "keyed hash: look them up with the site's own index, never by name in this page.</p>"
    )

    add("<h2>Summary</h2><table>")
    summary_rows = [
        ("Files found", counts.get("files_found", 0)),
        ("Images screened", counts.get("images_screened", 0)),
        ("Files rejected", counts.get("files_rejected", 0)),
        ("Images with at least one flagged finding", counts.get("images_flagged", 0)),
        ("Studies screened", counts.get("studies_screened", 0)),
        ("Studies with at least one flagged finding", counts.get("studies_flagged", 0)),
        ("Throughput (images/s)", f"{summary.get('images_per_s', 0.0):.1f}"),
    ]
    for name, value in summary_rows:
        add(f"<tr><th>{_esc(name)}</th><td class='num'>{_esc(value)}</td></tr>")
    add("</table>")
    rejected = summary.get("rejected_by_reason", {})
    if rejected:
        add(
            "<p>Rejected files by reason (the file list is in <code>private/rejected.csv</code>, "
            "kept out of this page):</p>"
            "<table>"
        )
        add("<tr><th>Reason</th><th>Files</th></tr>")
        for reason, n in sorted(rejected.items(), key=lambda kv: -kv[1]):
            add(f"<tr><td>{_esc(reason)}</td><td class='num'>{int(n)}</td></tr>")
        add("</table>")

    add("<h2>Findings</h2><table><tr><th>Finding</th><th>Threshold</th><th>Threshold from</th>")
    add("<th>Images flagged</th><th>% of images</th><th>Mean score</th></tr>")
    n_images = max(int(counts.get("images_screened", 0)), 1)
    for label in label_ids:
        info = per_label.get(label, {})
        source = _source_text(sources.get(label, ""), summary.get("unreliable_labels", {}).get(label))
        flagged = int(info.get("flagged", 0))
        add(
            f"<tr><td>{_esc(label_names.get(label, label))}</td>"
            f"<td class='num'>{_threshold_text(thresholds.get(label))}</td>"
            f"<td>{_esc(source)}</td>"
            f"<td class='num'>{flagged}</td><td class='num'>{100.0 * flagged / n_images:.1f}</td>"
            f"<td class='num'>{float(info.get('mean_score', 0.0)):.3f}</td></tr>"
        )
    add("</table>")

    add(
        "<h2>Score distributions</h2><p class='meta'>Histogram of scores per finding; the red dashed line "
        "is the finding's threshold (scores at or above it are flagged).</p>"
    )
    png = render_histograms_png(
        np.asarray(scores, dtype=np.float64).reshape(-1, len(label_ids)), label_ids, label_names, thresholds
    )
    add(f"<img class='hist' alt='Histograms of scores per finding' src='data:image/png;base64,{_b64(png)}'>")

    shown = [r for r in top_rows if r.get("flagged")][:MAX_TOP_ROWS]
    add(f"<h2>Most abnormal images ({len(shown)} shown)</h2>")
    if not shown:
        add("<p>No image reached a threshold.</p>")
    else:
        with_thumbs = bool(thumbnails)
        add("<table><tr><th>#</th>" + ("<th>Image</th>" if with_thumbs else ""))
        add(
            "<th>Study key</th><th>Image key</th><th>Eye</th><th>Flagged findings (score)</th>"
            "<th>Margin</th></tr>"
        )
        for rank, row in enumerate(shown, start=1):
            flags = "".join(
                f"<span class='flag'>{_esc(label_names.get(lab, lab))} "
                f"{float(row.get('scores', {}).get(lab, 0)):.2f}</span>"
                for lab in row["flagged"]
            )
            thumb = ""
            if with_thumbs:
                data = thumbnails.get(row["image_key"]) if thumbnails else None
                thumb = (
                    f"<td><img class='thumb' alt='thumbnail' src='data:image/jpeg;base64,{_b64(data)}'></td>"
                    if data
                    else "<td></td>"
                )
            add(
                f"<tr><td class='num'>{rank}</td>{thumb}<td class='key'>{_esc(row['study_key'])}</td>"
                f"<td class='key'>{_esc(row['image_key'])}</td><td>{_esc(row.get('laterality') or '?')}</td>"
                f"<td>{flags}</td><td class='num'>{float(row.get('abnormality', 0.0)):+.3f}</td></tr>"
            )
        add("</table>")
        add(
            "<p class='meta'>Margin: the largest amount by which a finding's score exceeds its threshold "
            "(the sort key of results.csv).</p>"
        )
    add("<p class='meta'>This page holds no patient name, patient ID, accession number or file path.</p>")
    add("</body></html>")
    return "\n".join(parts)


def _threshold_text(value: float | None) -> str:
    return "&mdash;" if value is None else f"{float(value):.3f}"


def _source_text(source: str, auc: float | None = None) -> str:
    if source == "unreliable":
        shown = "?" if auc is None else f"{auc:.2f}"
        return f"not flagged: validation AUC {shown} too low"
    return {
        "model": "validated operating point (model)",
        "cli": "command line (all findings)",
        "cli-label": "command line (this finding)",
        "default": "default 0.5 (not validated)",
    }.get(source, source)


def write_report(path: Path, html_text: str) -> Path:
    """Write atomically, so a half-written page never replaces a good one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(html_text, encoding="utf-8")
    tmp.replace(path)
    return path
