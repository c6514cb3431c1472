"""Per-label operating points for screening: the threshold that reaches a target sensitivity.

A screening tool is judged by what it misses, so each label's cut-off is chosen on a validation split
as the *highest* score threshold that still flags at least `target_sensitivity` of the validation
positives (keeping as many negatives unflagged as that allows). Zero-shot probabilities are not
calibrated and differ in scale between labels, so one global 0.5 would miss some findings entirely and
flood others; per-label points fix that. They travel inside the model checkpoint (`meta["thresholds"]`)
so every site screens with the operating points the model was validated at, and the command line can
still override them (a clinic may want higher sensitivity for one finding).

A label whose validation AUC stays below `min_auc` is not flagged at all ("unreliable"): forcing it to
a target sensitivity would flag most images and bury the findings the model does recognise. Its
scores are still reported, and a command-line threshold re-enables it on purpose.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_THRESHOLD = 0.5
DEFAULT_TARGET_SENSITIVITY = 0.9
DEFAULT_MIN_AUC = 0.6


@dataclass(frozen=True)
class OperatingPoint:
    """One label's threshold and what it achieved on the validation split it was chosen on."""

    label_id: str
    threshold: float
    sensitivity: float
    specificity: float
    n_positive: int
    n_negative: int
    auc: float = float("nan")

    def to_json_dict(self) -> dict:
        return asdict(self)


def threshold_for_sensitivity(y_true: np.ndarray, scores: np.ndarray, target: float) -> float | None:
    """Highest threshold t with sensitivity(score >= t) >= target; None when there is no positive.

    Flagging is `score >= t`, so t equal to the k-th highest positive score, with k = ceil(target * P),
    flags exactly the k best-scored positives (more on ties) — any higher t flags fewer than k.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true and scores differ in length: {y.shape} vs {s.shape}")
    pos = np.sort(s[y])[::-1]
    if pos.size == 0:
        return None
    k = max(1, math.ceil(target * pos.size - 1e-9))
    return float(pos[k - 1])


def operating_points(
    y_true: np.ndarray,
    scores: np.ndarray,
    label_ids: Sequence[str],
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
) -> dict[str, OperatingPoint]:
    """Operating point per label from a validation split ([N, C] truth and scores, columns = label_ids).

    Labels without any validation positive get no operating point: inventing one would be a guess,
    so screening falls back to the default threshold for them (and says so in its summary).
    """
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 2 or s.shape != y.shape or y.shape[1] != len(label_ids):
        raise ValueError(
            f"expected y_true and scores of shape [N, {len(label_ids)}], got {y.shape} and {s.shape}"
        )
    from vilref_fed.eval.metrics import roc_auc

    points: dict[str, OperatingPoint] = {}
    for c, label in enumerate(label_ids):
        yc = y[:, c].astype(bool)
        t = threshold_for_sensitivity(yc, s[:, c], target_sensitivity)
        if t is None:
            continue
        flagged = s[:, c] >= t
        n_pos, n_neg = int(yc.sum()), int((~yc).sum())
        sens = float((flagged & yc).sum() / n_pos)
        spec = float((~flagged & ~yc).sum() / n_neg) if n_neg else float("nan")
        auc = roc_auc(yc, s[:, c]) if n_neg else float("nan")
        points[label] = OperatingPoint(label, t, sens, spec, n_pos, n_neg, float(auc))
    return points


def parse_threshold_options(
    values: Sequence[str], label_ids: Sequence[str]
) -> tuple[float | None, dict[str, float]]:
    """Command-line `--threshold` values: a bare number (all labels) and/or `LABEL=NUMBER` (one label).

    Raises ValueError with a message naming the bad value and the valid label ids.
    """
    global_value: float | None = None
    per_label: dict[str, float] = {}
    known = set(label_ids)
    for raw in values:
        text = raw.strip()
        if "=" in text:
            label, _, number = text.partition("=")
            label = label.strip()
            if label not in known:
                raise ValueError(
                    f"unknown label {label!r} in --threshold {raw!r}; labels: {', '.join(label_ids)}"
                )
            per_label[label] = _probability(number, raw)
        else:
            global_value = _probability(text, raw)
    return global_value, per_label


def _probability(text: str, raw: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--threshold {raw!r} is not a number or LABEL=NUMBER") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--threshold {raw!r} must lie between 0 and 1 (scores are probabilities)")
    return value


def resolve_thresholds(
    label_ids: Sequence[str],
    stored: Mapping[str, float] | None = None,
    global_override: float | None = None,
    per_label_override: Mapping[str, float] | None = None,
    default: float = DEFAULT_THRESHOLD,
    unreliable: Iterable[str] = (),
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Threshold per label and where it came from: "cli-label" > "cli" > "unreliable" > "model" > "default".

    None means "never flagged" (a label the validation found unreliable). The source is reported in
    the screening summary, so a reader knows whether a flag came from a validated operating point or
    from the untuned default.
    """
    stored = dict(stored or {})
    per_label_override = dict(per_label_override or {})
    unreliable = set(unreliable)
    thresholds: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    for label in label_ids:
        if label in per_label_override:
            thresholds[label], sources[label] = float(per_label_override[label]), "cli-label"
        elif global_override is not None:
            thresholds[label], sources[label] = float(global_override), "cli"
        elif label in unreliable:
            thresholds[label], sources[label] = None, "unreliable"
        elif label in stored and stored[label] is not None:
            thresholds[label], sources[label] = float(stored[label]), "model"
        else:
            thresholds[label], sources[label] = float(default), "default"
    return thresholds, sources


class ThresholdError(ValueError):
    """Calibration could not run (bad model file, empty split, unknown split); one-line message."""


def validation_scores(model, dataset, label_ids: Sequence[str], lang: str, batch_size: int = 64):
    """(truth [N, C] bool, scores [N, C]) of a labelled split, scored exactly as screening scores images.

    Uses the image-level "truth" of an item when the dataset has it (synthetic hospitals), else its
    report-derived "labels" (a site's validation split); columns follow the dataset's `label_ids`
    (the ontology order when it has none).
    """
    import torch

    from vilref_fed.eval import build_zeroshot_classifier, zeroshot_scores
    from vilref_fed.ontology import load_ontology

    ontology = load_ontology()
    item_labels = list(getattr(dataset, "label_ids", None) or ontology.label_ids)
    missing = [label for label in label_ids if label not in item_labels]
    if missing:
        raise ThresholdError(f"the validation data has no column for {', '.join(missing)}")
    columns = [item_labels.index(label) for label in label_ids]
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        classifier = build_zeroshot_classifier(model, ontology, list(label_ids), lang=lang)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        truth, scores = [], []
        for batch in loader:
            scores.append(zeroshot_scores(model, batch["image"].to(device), classifier).float().cpu().numpy())
            target = batch["truth"] if "truth" in batch else batch["labels"]
            truth.append(target[:, columns].numpy())
    if not scores:
        raise ThresholdError("the validation split is empty; ingest more data or use another --split")
    return np.concatenate(truth) > 0.5, np.concatenate(scores)


def calibrate_model_file(
    model_path,
    out_path,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    site_dir=None,
    data_dir=None,
    split: str = "val",
    lang: str | None = None,
    min_auc: float = DEFAULT_MIN_AUC,
):
    """Operating points on a site's (or synthetic folder's) split, stored in the model file's meta:
    meta["thresholds"] {label: t} for labels with validation AUC >= min_auc, meta["unreliable_labels"]
    {label: auc} for the others (never flagged), meta["thresholds_info"] how they were obtained.

    Returns (points, written path). Labels without a validation positive get neither (screening uses
    the default threshold for them and says it is not validated). Replaces any earlier calibration.
    """
    from pathlib import Path

    from vilref_fed.model import load_checkpoint, save_checkpoint
    from vilref_fed.ontology import load_ontology

    try:
        model, meta = load_checkpoint(model_path)
    except (ValueError, OSError) as exc:
        raise ThresholdError(str(exc)) from None
    cfg = model.config
    lang = lang or meta.get("prompt_language") or "en"
    try:
        if site_dir is not None:
            from vilref_fed.data.site_dataset import SiteDataset

            dataset = SiteDataset(
                Path(site_dir), split=split, image_size=cfg.image_size, mean=cfg.image_mean, std=cfg.image_std
            )
        else:
            from vilref_fed.data.folder_dataset import FolderPairDataset

            dataset = FolderPairDataset(
                Path(data_dir), cfg.image_size, cfg.image_mean, cfg.image_std, split=split
            )
    except Exception as exc:  # SiteError, missing files, bad split: all mean the same to the user
        raise ThresholdError(f"cannot open the validation split: {exc}") from None
    label_ids = list(load_ontology().label_ids)
    truth, scores = validation_scores(model, dataset, label_ids, lang)
    points = operating_points(truth, scores, label_ids, target_sensitivity)
    if not points:
        raise ThresholdError(
            "no label has a positive case in this split; calibrate on a larger labelled split"
        )
    # NaN AUC (no negative in the split) cannot show a lack of skill: such a label keeps its point.
    meta["thresholds"] = {label: p.threshold for label, p in points.items() if not p.auc < min_auc}
    meta["unreliable_labels"] = {label: p.auc for label, p in points.items() if p.auc < min_auc}
    meta["thresholds_info"] = {
        "target_sensitivity": float(target_sensitivity),
        "min_auc": float(min_auc),
        "split": split,
        "language": lang,
        "n_images": int(truth.shape[0]),
        "points": {label: p.to_json_dict() for label, p in points.items()},
    }
    written = save_checkpoint(out_path, model, extra=meta)
    return points, written
