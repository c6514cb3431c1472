"""Zero-shot screening of fundus exports: files in, a ranked and de-identified list of findings out.

The day-to-day use of the model at a hospital. The pipeline reads files with the ingestion reader
(`vilref_fed.data.dicom.read_fundus_file`: same validation, same rejection reasons), preprocesses
them exactly as training saw them (`canonical_image` at the site's canonical size, then
`to_model_tensor` with the model's size and statistics), decodes in DataLoader worker processes
while the main process runs the image tower batch after batch (CUDA when present), and scores each
label zero-shot with the ontology's prompts through the eval package's classifier.

De-identification. Patient identifiers never leave the decoding worker: it turns the Study and SOP
Instance UIDs into keyed hashes before handing the image over, with the site's construction
(`vilref_fed.data.site.keyed_hash`, HMAC-SHA-256) cut to 16 hex digits. With `site_dir` the key is
the site's secret, so a study key is the first 16 digits of the study_key ingestion stored; without
it a random key is created once per output directory in OUTDIR/private/screen.key (re-running into
the same directory keeps keys stable). One rule for the output directory: everything outside
private/ is de-identified and can go to the clinic (results.csv, summary.json, report.html);
private/ (owner-only permissions) holds what points back to files, which the clinic needs to open
a flagged study: source_index.csv (image key -> file, frame), rejected.csv (file, reason, message:
export folder names often contain patient IDs) and the run key.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from vilref_fed.logs import get_logger

NORMAL_LABEL = "normal"
KEY_HEX_DIGITS = 16
LATERALITY = {"R": "OD", "L": "OS", "B": "OU"}
RESULTS_CSV = "results.csv"
SUMMARY_JSON = "summary.json"
REPORT_HTML = "report.html"
REJECTED_CSV = "rejected.csv"
PRIVATE_DIR = "private"
KEY_FILE = "screen.key"
SOURCE_INDEX = "source_index.csv"
THUMBNAIL_COUNT = 24

log = get_logger("screen")


class ScreeningError(ValueError):
    """Screening could not produce any result; the message says why and what to do (one line)."""


@dataclass
class ScreenOptions:
    """What `vilref-client screen` was asked to do (everything but the model)."""

    inputs: Sequence[Path]
    out_dir: Path
    labels: Sequence[str] | None = None
    thresholds: Sequence[str] = ()
    lang: str | None = None
    batch_size: int = 32
    workers: int | None = None
    device: str | None = None
    thumbnails: bool = False
    site_dir: Path | None = None
    canonical_size: int | None = None
    progress: bool = True


@dataclass
class ScreenedImage:
    """One screened image: keys, laterality, scores per selected label, what was flagged."""

    image_key: str
    study_key: str
    laterality: str
    scores: np.ndarray
    flagged: list[str] = field(default_factory=list)
    abnormality: float = 0.0


@dataclass(frozen=True)
class RejectedFile:
    path: str
    reason: str
    message: str


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------


def short_key(key: bytes, kind: str, value: str) -> str:
    """The site's keyed hash of an identifier (HMAC-SHA-256), first 16 hex digits: short enough to read
    out on the phone, long enough (64 bits) that two studies of one hospital never collide in practice."""
    from vilref_fed.data.site import keyed_hash

    return (keyed_hash(key, kind, value) or "")[:KEY_HEX_DIGITS]


def run_key(out_dir: Path) -> bytes:
    """The per-output-directory key, created (owner-only) on first use and reused afterwards."""
    private = out_dir / PRIVATE_DIR
    private.mkdir(parents=True, exist_ok=True)
    os.chmod(private, 0o700)
    path = private / KEY_FILE
    if path.is_file() and path.stat().st_size == 32:
        return path.read_bytes()
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


@dataclass(frozen=True)
class SiteSettings:
    """What screening takes from a site: its secret, canonical image size and reader settings."""

    key: bytes
    canonical_size: int
    limits: Any
    rule: Any


def site_settings(site_dir: Path | None, out_dir: Path) -> SiteSettings:
    """The site's secret and the reader settings ingestion uses (same limits, same fundus rule);
    without a site, the defaults and a per-output-directory key."""
    from vilref_fed.data.dicom import FundusRule, ReadLimits
    from vilref_fed.data.preprocess import DEFAULT_CANONICAL_SIZE
    from vilref_fed.data.site import SiteError, open_site

    if site_dir is None:
        return SiteSettings(run_key(out_dir), DEFAULT_CANONICAL_SIZE, ReadLimits(), FundusRule())
    try:
        with open_site(site_dir) as site:
            cfg = site.config
            return SiteSettings(site.hash_secret, int(cfg.image_size), cfg.read_limits(), cfg.fundus_rule())
    except SiteError as exc:
        raise ScreeningError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# input discovery and decoding (runs in DataLoader workers)
# ---------------------------------------------------------------------------------------------


def discover_files(inputs: Iterable[Path], exclude: Path | None = None) -> list[Path]:
    """Every regular file under the inputs (recursively, any name), sorted, without duplicates.

    DICOM exports often have no extension, so nothing is filtered by name; the reader decides.
    Hidden files (names starting with ".") are skipped: they are OS metadata, not exports; so is
    `exclude` (the output directory, when someone writes results inside the export folder).
    """
    found: dict[str, Path] = {}
    skip = str(Path(exclude).resolve()) if exclude is not None else None
    for root in inputs:
        root = Path(root)
        if not root.exists():
            raise ScreeningError(f"input {root} does not exist; give DICOM/PNG/JPEG files or folders")
        if root.is_file():
            found.setdefault(str(root.resolve()), root)
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            if skip is not None and str(Path(dirpath).resolve()) == skip:
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                p = Path(dirpath) / name
                if p.is_file():
                    found.setdefault(str(p.resolve()), p)
    return sorted(found.values(), key=lambda p: str(p))


class ScreeningDataset:
    """Map-style dataset over files: each item is one file's decoded, preprocessed frames or a rejection.

    A torch Dataset by protocol (__len__/__getitem__), picklable for worker processes. Items are dicts:
    {"index", "frames": [{"tensor", "image_key", "study_key", "laterality", "frame"}], "rejection"}.
    """

    def __init__(
        self,
        files: Sequence[Path],
        key: bytes,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        canonical_size: int,
        limits: Any = None,
        rule: Any = None,
    ) -> None:
        self.files = [str(f) for f in files]
        self.limits = limits
        self.rule = rule
        self.key = key
        self.image_size = int(image_size)
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)
        self.canonical_size = int(canonical_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from vilref_fed.data.dicom import FundusRule, ReadLimits, Rejection, read_fundus_file
        from vilref_fed.data.preprocess import canonical_image, content_hash, to_model_tensor

        path = self.files[index]
        try:
            result = read_fundus_file(path, self.limits or ReadLimits(), self.rule or FundusRule())
        except Exception as exc:  # the reader promises not to raise; a bug must still not stop the run
            return {
                "index": index,
                "frames": [],
                "rejection": ("decode_failure", f"unexpected error: {type(exc).__name__}"),
            }
        if isinstance(result, Rejection):
            return {"index": index, "frames": [], "rejection": (result.reason, result.message)}
        frames = []
        for fr in result:
            try:
                rgb = canonical_image(fr.rgb(), size=self.canonical_size)
            except Exception as exc:
                return {
                    "index": index,
                    "frames": [],
                    "rejection": ("decode_failure", f"cannot preprocess: {exc}"),
                }
            header = fr.header
            if header is not None and header.sop_instance_uid:
                image_key = short_key(self.key, "sop", header.sop_instance_uid)
                if len(result) > 1:
                    image_key += f"-f{fr.index}"
            else:
                image_key = short_key(self.key, "content", content_hash(rgb))
            if header is not None and header.study_instance_uid:
                study_key = short_key(self.key, "study", header.study_instance_uid)
            else:
                study_key = image_key  # a lone PNG/JPEG: the image is its own study
            laterality = LATERALITY.get((header.laterality or "") if header else "", "")
            tensor = to_model_tensor(rgb, self.image_size, self.mean, self.std)
            frames.append(
                {
                    "tensor": tensor,
                    "image_key": image_key,
                    "study_key": study_key,
                    "laterality": laterality,
                    "frame": fr.index,
                }
            )
        return {"index": index, "frames": frames, "rejection": None}


def _collate_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def _quiet_numpy_view_warning() -> None:
    """to_model_tensor wraps a read-only PIL view (it never writes to it); keep the console clean."""
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)
    _quiet_numpy_view_warning()


def default_workers() -> int:
    """Decoding workers: leave one core to the main process (which runs the model on CPU)."""
    cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------


def select_device(requested: str | None = None):
    """The requested device, checked (a missing GPU is a one-line error, not a CUDA traceback)."""
    import torch

    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ScreeningError(f"unknown device {requested!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ScreeningError(
                f"--device {requested} asked for a GPU but CUDA is not available; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ScreeningError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def _resolve_labels(requested: Sequence[str] | None, ontology) -> list[str]:
    all_ids = list(ontology.label_ids)
    if not requested:
        return all_ids
    wanted: list[str] = []
    for item in requested:
        for part in str(item).split(","):
            part = part.strip()
            if part and part not in wanted:
                wanted.append(part)
    unknown = [w for w in wanted if w not in all_ids]
    if unknown:
        raise ScreeningError(f"unknown label(s) {', '.join(unknown)}; labels: {', '.join(all_ids)}")
    return [label for label in all_ids if label in wanted]  # ontology order


def score_batch(model, images, classifier):
    """[B,3,H,W] on the model's device -> [B, C] probabilities, via the eval package's scheme."""
    from vilref_fed.eval import zeroshot_scores

    return zeroshot_scores(model, images, classifier)


def flag_images(
    images: list[ScreenedImage], label_ids: Sequence[str], thresholds: dict[str, float | None]
) -> None:
    """Flag labels at or above their threshold and compute each image's sort key.

    `normal` is scored and reported but never "flagged": it is the absence of findings, and a screen
    ranks what needs a clinician; nor is a label whose threshold is None (found unreliable on the
    validation split). abnormality = the largest (score - threshold) over the flaggable labels, so it is
    positive exactly when something is flagged and orders images by how clearly they are. With no
    flaggable label it is (highest finding score - 1): never positive, still a sensible order.
    """
    t = np.array([np.nan if thresholds[x] is None else thresholds[x] for x in label_ids], dtype=np.float64)
    disease = np.array([label != NORMAL_LABEL for label in label_ids])
    flaggable = disease & ~np.isnan(t)
    for img in images:
        scores = img.scores.astype(np.float64)
        margin = scores - t
        img.flagged = [x for x, m, ok in zip(label_ids, margin, flaggable, strict=True) if ok and m >= 0]
        if flaggable.any():
            img.abnormality = float(margin[flaggable].max())
        else:
            img.abnormality = float(scores[disease].max()) - 1.0 if disease.any() else -1.0


def sort_images(images: list[ScreenedImage]) -> list[ScreenedImage]:
    """Most abnormal first; ties broken by keys so the order is reproducible."""
    return sorted(images, key=lambda r: (-r.abnormality, r.study_key, r.image_key))


def run_screening(model, meta: dict[str, Any], options: ScreenOptions, console=None) -> dict[str, Any]:
    """Screen `options.inputs` with `model` and write every output; returns the JSON summary.

    Raises ScreeningError when nothing could be screened (after writing rejected.csv and the summary,
    so IT can see why) or when the request itself is wrong (unknown label, bad threshold, no input).
    """
    import torch

    from vilref_fed.eval import build_zeroshot_classifier
    from vilref_fed.eval.thresholds import parse_threshold_options, resolve_thresholds
    from vilref_fed.ontology import load_ontology

    started = time.perf_counter()
    _quiet_numpy_view_warning()
    out_dir = Path(options.out_dir)
    ontology = load_ontology()
    label_ids = _resolve_labels(options.labels, ontology)
    try:
        global_t, per_label_t = parse_threshold_options(list(options.thresholds), label_ids)
    except ValueError as exc:
        raise ScreeningError(str(exc)) from None
    unreliable = dict(meta.get("unreliable_labels") or {})
    thresholds, sources = resolve_thresholds(
        label_ids, meta.get("thresholds"), global_t, per_label_t, unreliable=unreliable
    )
    lang = options.lang or meta.get("prompt_language") or "en"
    if lang not in ("en", "zh"):
        raise ScreeningError(f"prompt language {lang!r} is not available; use en or zh")
    if options.batch_size < 1:
        raise ScreeningError("--batch-size must be at least 1")

    files = discover_files(options.inputs, exclude=out_dir)
    if not files:
        raise ScreeningError("no files found in the given inputs; point --input at a DICOM export folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    site = site_settings(options.site_dir, out_dir)
    canonical_size = options.canonical_size or site.canonical_size

    device = select_device(options.device)
    model = model.to(device).eval()
    cfg = model.config
    dataset = ScreeningDataset(
        files, site.key, cfg.image_size, cfg.image_mean, cfg.image_std, canonical_size, site.limits, site.rule
    )
    workers = default_workers() if options.workers is None else max(0, int(options.workers))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=max(1, min(options.batch_size, 16)),
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate_items,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    # Start the workers first: they decode the first files while the text tower embeds the prompts.
    batches = iter(loader)
    with torch.inference_mode():
        classifier = build_zeroshot_classifier(model, ontology, label_ids, lang=lang).to(device)

    images: list[ScreenedImage] = []
    sources_index: list[tuple[str, str, int]] = []  # image_key, path, frame
    rejected: list[RejectedFile] = []
    pending: list[dict[str, Any]] = []
    use_amp = device.type == "cuda"

    def flush(batch: list[dict[str, Any]]) -> None:
        x = torch.stack([f["tensor"] for f in batch]).to(device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            probs = score_batch(model, x, classifier)
        probs = probs.float().cpu().numpy()
        for f, p in zip(batch, probs, strict=True):
            images.append(ScreenedImage(f["image_key"], f["study_key"], f["laterality"], p))

    loop_started = time.perf_counter()
    with _progress(console, len(files), options.progress) as advance:
        for items in batches:
            for item in items:
                path = files[item["index"]]
                if item["rejection"] is not None:
                    reason, message = item["rejection"]
                    rejected.append(RejectedFile(str(path), reason, message))
                for f in item["frames"]:
                    sources_index.append((f["image_key"], str(path), f["frame"]))
                pending.extend(item["frames"])
                while len(pending) >= options.batch_size:
                    flush(pending[: options.batch_size])
                    del pending[: options.batch_size]
            advance(len(items), len(images))
        if pending:
            flush(pending)
            advance(0, len(images))
    elapsed = time.perf_counter() - started
    timing = {
        "startup_s": round(loop_started - started, 3),
        "scoring_s": round(elapsed - (loop_started - started), 3),
    }

    flag_images(images, label_ids, thresholds)
    images = sort_images(images)
    write_rejected(out_dir / PRIVATE_DIR / REJECTED_CSV, rejected)
    write_source_index(out_dir, sources_index)
    summary = build_summary(
        images,
        rejected,
        files,
        label_ids,
        thresholds,
        sources,
        lang,
        meta,
        ontology,
        str(device),
        options.batch_size,
        elapsed,
        timing,
    )
    if not images:
        write_json(out_dir / SUMMARY_JSON, summary)
        reasons = ", ".join(f"{n} {r}" for r, n in Counter(r.reason for r in rejected).most_common())
        raise ScreeningError(
            f"no image could be screened: all {len(files)} file(s) were rejected ({reasons}); "
            f"see {out_dir / PRIVATE_DIR / REJECTED_CSV}"
        )
    write_results_csv(out_dir / RESULTS_CSV, images, label_ids)
    write_json(out_dir / SUMMARY_JSON, summary)

    from vilref_fed.eval.screen_report import build_report_html, write_report

    names = {label.id: label.name_en for label in ontology.labels}
    thumbs = (
        make_thumbnails(images, sources_index, canonical_size, site.limits, site.rule)
        if options.thumbnails
        else None
    )
    scores = np.stack([img.scores for img in images]) if images else np.zeros((0, len(label_ids)))
    top = [_row_dict(img, label_ids) for img in images[:THUMBNAIL_COUNT]]
    write_report(out_dir / REPORT_HTML, build_report_html(summary, label_ids, names, scores, top, thumbs))
    return summary


class _progress:
    """A rich progress bar over files with the running images/s, or nothing when disabled."""

    def __init__(self, console, total: int, enabled: bool) -> None:
        self.console, self.total, self.enabled = console, total, enabled
        self._progress = None
        self._task = None
        self._t0 = 0.0

    def __enter__(self) -> Callable[[int, int], None]:
        self._t0 = time.perf_counter()
        if not self.enabled:
            return lambda files, images: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]screening"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("files"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.__enter__()
        self._task = self._progress.add_task("screen", total=self.total, rate="")

        def advance(files: int, images: int) -> None:
            dt = max(time.perf_counter() - self._t0, 1e-9)
            self._progress.update(
                self._task, advance=files, rate=f"{images} images, {images / dt:.1f} images/s"
            )

        return advance

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------


def _row_dict(img: ScreenedImage, label_ids: Sequence[str]) -> dict[str, Any]:
    return {
        "study_key": img.study_key,
        "image_key": img.image_key,
        "laterality": img.laterality,
        "abnormality": img.abnormality,
        "flagged": list(img.flagged),
        "scores": {label: float(s) for label, s in zip(label_ids, img.scores, strict=True)},
    }


def results_header(label_ids: Sequence[str]) -> list[str]:
    return [
        "rank",
        "study_key",
        "image_key",
        "laterality",
        "abnormality",
        "flagged",
        *[f"p_{lab}" for lab in label_ids],
    ]


def write_results_csv(path: Path, images: Sequence[ScreenedImage], label_ids: Sequence[str]) -> Path:
    """results.csv: one row per image, most abnormal first; flagged labels joined by ';'."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(results_header(label_ids))
        for rank, img in enumerate(images, start=1):
            w.writerow(
                [
                    rank,
                    img.study_key,
                    img.image_key,
                    img.laterality,
                    f"{img.abnormality:.4f}",
                    ";".join(img.flagged),
                    *[f"{float(s):.4f}" for s in img.scores],
                ]
            )
    tmp.replace(path)
    return path


def write_rejected(path: Path, rejected: Sequence[RejectedFile]) -> Path:
    """private/rejected.csv (owner-only): file, reason category, message; header even when empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reason", "message"])
        for r in rejected:
            w.writerow([r.path, r.reason, r.message])
    return path


def write_source_index(out_dir: Path, rows: Sequence[tuple[str, str, int]]) -> Path:
    """private/source_index.csv (owner-only): image key -> source file and frame, to open a flagged study."""
    private = out_dir / PRIVATE_DIR
    private.mkdir(parents=True, exist_ok=True)
    os.chmod(private, 0o700)
    path = private / SOURCE_INDEX
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image_key", "path", "frame"])
        w.writerows(rows)
    return path


def write_json(path: Path, data: dict[str, Any]) -> Path:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def build_summary(
    images: Sequence[ScreenedImage],
    rejected: Sequence[RejectedFile],
    files: Sequence[Path],
    label_ids: Sequence[str],
    thresholds: dict[str, float | None],
    sources: dict[str, str],
    lang: str,
    meta: dict[str, Any],
    ontology,
    device: str,
    batch_size: int,
    elapsed: float,
    timing: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The JSON summary for other systems: counts, per-label statistics, thresholds, flagged studies."""
    import vilref_fed

    scores = np.stack([img.scores for img in images]) if images else np.zeros((0, len(label_ids)))
    per_label = {}
    for c, label in enumerate(label_ids):
        col = scores[:, c] if len(images) else np.zeros(0)
        per_label[label] = {
            "flagged": int(sum(label in img.flagged for img in images)),
            "mean_score": float(col.mean()) if col.size else 0.0,
            "max_score": float(col.max()) if col.size else 0.0,
        }
    studies: dict[str, dict[str, Any]] = {}
    for img in images:
        s = studies.setdefault(
            img.study_key, {"study_key": img.study_key, "images": 0, "abnormality": -1e9, "flagged": []}
        )
        s["images"] += 1
        s["abnormality"] = max(s["abnormality"], img.abnormality)
        s["flagged"] = sorted(set(s["flagged"]) | set(img.flagged), key=list(label_ids).index)
    flagged_studies = sorted(
        (s for s in studies.values() if s["flagged"]), key=lambda s: (-s["abnormality"], s["study_key"])
    )
    model_cfg = meta.get("model_config") or {}
    model_hash = meta.get("ontology_hash")
    return {
        "tool": "vilref-client screen",
        "version": vilref_fed.__version__,
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "model": {
            "name": model_cfg.get("name", "?"),
            "ontology_hash": model_hash,
            "prompt_language": meta.get("prompt_language"),
            "ontology_matches": (model_hash == ontology.hash) if model_hash else None,
        },
        "ontology": {"version": ontology.version, "hash": ontology.hash},
        "language": lang,
        "labels": list(label_ids),
        "thresholds": {k: (None if v is None else float(v)) for k, v in thresholds.items()},
        "unreliable_labels": {k: float(v) for k, v in (meta.get("unreliable_labels") or {}).items()},
        "threshold_sources": dict(sources),
        "device": device,
        "batch_size": int(batch_size),
        "elapsed_s": round(elapsed, 3),
        # start-up (discovery, model to device, prompt embedding) vs the decode-and-score loop
        "timing": dict(timing or {}),
        "images_per_s": round(len(images) / elapsed, 3) if elapsed > 0 else 0.0,
        "counts": {
            "files_found": len(files),
            "files_rejected": len(rejected),
            "images_screened": len(images),
            "images_flagged": int(sum(bool(img.flagged) for img in images)),
            "studies_screened": len(studies),
            "studies_flagged": len(flagged_studies),
        },
        "rejected_by_reason": dict(Counter(r.reason for r in rejected).most_common()),
        "per_label": per_label,
        "flagged_studies": flagged_studies,
        "outputs": {
            "results": RESULTS_CSV,
            "report": REPORT_HTML,
            "rejected": f"{PRIVATE_DIR}/{REJECTED_CSV}",
        },
    }


def make_thumbnails(
    images: Sequence[ScreenedImage],
    index: Sequence[tuple[str, str, int]],
    canonical_size: int,
    limits: Any = None,
    rule: Any = None,
) -> dict[str, bytes]:
    """JPEG thumbnails of the top flagged images, re-read from their files (only these few are kept)."""
    from vilref_fed.data.dicom import FundusRule, ReadLimits, Rejection, read_fundus_file
    from vilref_fed.data.preprocess import canonical_image
    from vilref_fed.eval.screen_report import thumbnail_jpeg

    where = {key: (path, frame) for key, path, frame in index}
    thumbs: dict[str, bytes] = {}
    for img in [i for i in images if i.flagged][:THUMBNAIL_COUNT]:
        path, frame = where[img.image_key]
        frames = read_fundus_file(path, limits or ReadLimits(), rule or FundusRule())
        if isinstance(frames, Rejection) or frame >= len(frames):
            continue
        thumbs[img.image_key] = thumbnail_jpeg(canonical_image(frames[frame].rgb(), size=canonical_size))
    return thumbs


def screen_model_file(model_path: Path, options: ScreenOptions, console=None) -> dict[str, Any]:
    """Load a vilref-fed model file and screen with it (what the CLI calls)."""
    from vilref_fed.model import load_checkpoint

    try:
        model, meta = load_checkpoint(model_path)
    except (ValueError, OSError) as exc:
        hint = ""
        if "format tag" in str(exc):
            hint = "; convert a released ViLReF checkpoint with `vilref-client import-chinese-clip` first"
        raise ScreeningError(f"{exc}{hint}") from None
    return run_screening(model, meta, options, console=console)
