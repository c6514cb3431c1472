"""The ingestion engine: DICOM exports + report CSVs -> a de-identified, linked site dataset.

Guarantees, and how they are kept:
- **Idempotent**: a file is skipped when its keyed path, size and mtime are already recorded; images
  are keyed by the SHA-256 of their canonical pixels and by (SOP Instance UID, frame), reports by a
  keyed report ID; a second run adds nothing.
- **Crash-safe and resumable**: a canonical PNG is written to a temporary name and renamed into place
  *before* the database rows that point to it are committed; rows for one file (all its frames, its
  duplicates or its quarantine entry) commit together. A kill at any moment leaves at worst PNGs that
  no row points to, which the next run deletes, and files without rows, which it processes again.
  An exclusive lock file stops two ingestions of one site from interleaving.
- **De-identified**: identifiers are turned into keyed hashes inside the decoding step (also in worker
  processes); nothing logged names a patient or quotes a report.
- **Never fatal on a bad item**: bad files go to quarantine with a reason, bad CSV rows to
  `report_issues` with file and line; only whole-input problems (missing folder, undecodable CSV,
  missing column) stop the run, and they do so before anything is written.
"""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import delete, func, select

from vilref_fed.data.dicom import (
    DicomRejected,
    FundusRule,
    ReadLimits,
    Rejection,
    decode_frames,
    inspect_dicom,
)
from vilref_fed.data.reports_csv import ReportRow, ReportsCsvError, ReportsFile, read_reports_csv
from vilref_fed.data.site import LINK_MODES, SECRET_FILE, SITE_TOML, Site, keyed_hash, patient_split
from vilref_fed.logs import get_logger
from vilref_fed.store.site_models import (
    Duplicate,
    Image,
    ImageReport,
    IngestRun,
    Quarantine,
    Report,
    ReportIssue,
    SourceFile,
)

log = get_logger("ingest")
LOCK_FILE = ".ingest.lock"
_EYE_OF_LATERALITY = {"R": "OD", "L": "OS"}


class IngestError(Exception):
    """A problem with the inputs as a whole; nothing was written. The message says what to do."""


class ProgressSink(Protocol):
    def phase(self, name: str, total: int | None) -> None: ...

    def advance(self, n: int = 1) -> None: ...


@dataclass
class IngestOptions:
    dicom: Sequence[Path] = ()
    reports: Sequence[Path] = ()
    link_by: str | None = None  # default: site.toml ingest.link_by
    encoding: str | None = None  # default: site.toml ingest.report_encoding
    workers: int | None = None  # default: site.toml ingest.workers
    commit_every: int = 32  # files per transaction (each file's rows are always atomic)


@dataclass
class RunCounts:
    """What this run did (site totals come from `site_status`)."""

    files_found: int = 0
    files_skipped: int = 0
    files_processed: int = 0
    accepted: int = 0
    duplicates: Counter[str] = field(default_factory=Counter)
    quarantined: Counter[str] = field(default_factory=Counter)
    report_rows: int = 0
    reports_new: int = 0
    reports_updated: int = 0
    reports_unchanged: int = 0
    report_issues: Counter[str] = field(default_factory=Counter)
    links_added: int = 0
    links_removed: int = 0
    orphan_pngs_removed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("duplicates", "quarantined", "report_issues"):
            d[k] = dict(sorted(getattr(self, k).items()))
        return d


@dataclass
class IngestResult:
    run: RunCounts
    status: dict[str, Any]
    interrupted: bool = False


# ----------------------------------------------------------------------------- decoding (worker side)


@dataclass
class FrameOut:
    index: int
    image_key: str
    png: bytes = field(repr=False)


@dataclass
class FileOut:
    """One file after decoding: a rejection, or frames plus only hashed/non-identifying header facts."""

    rejection: Rejection | None = None
    frames: list[FrameOut] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


def encode_png(rgb: Any) -> bytes:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, "PNG", compress_level=1)  # 2-4x faster than 6, ~10% larger
    return buf.getvalue()


def process_file(path: str, secret: bytes, image_size: int, limits: ReadLimits, rule: FundusRule) -> FileOut:
    """Read, validate, canonicalise and hash one file. Runs in worker processes: identifiers are hashed
    here, so clear identifiers never cross a process boundary."""
    from vilref_fed.data.preprocess import canonical_image, content_hash

    opened = inspect_dicom(path, limits, rule)
    if isinstance(opened, Rejection):
        return FileOut(rejection=opened)
    frames: list[FrameOut] = []
    try:
        for fr in decode_frames(opened):
            canon = canonical_image(fr.pixels, image_size)
            frames.append(FrameOut(fr.index, content_hash(canon), encode_png(canon)))
    except DicomRejected as exc:
        return FileOut(rejection=exc.rejection)
    except MemoryError:
        return FileOut(rejection=Rejection("absurd_dimensions", "not enough memory to decode the image"))
    except Exception as exc:  # a decoder bug must cost one file, not the run
        return FileOut(
            rejection=Rejection("decode_failure", f"cannot convert the image: {type(exc).__name__}")
        )
    h = opened.header
    path_bytes = os.fsencode(path)
    facts = {
        "sop_key": keyed_hash(secret, "sop", h.sop_instance_uid) or keyed_hash(secret, "nosop", path_bytes),
        "study_key": keyed_hash(secret, "study", h.study_instance_uid),
        "series_key": keyed_hash(secret, "series", h.series_instance_uid),
        "patient_key": keyed_hash(secret, "patient", h.patient_id),
        "accession_key": keyed_hash(secret, "accession", h.accession_number),
        "laterality": h.laterality,
        "acquisition_date": h.acquisition_date,
        "manufacturer": (h.manufacturer or "")[:128] or None,
        "model_name": (h.model_name or "")[:128] or None,
        "modality": h.modality[:16] or None,
        "sop_class": h.sop_class_name[:128],
        "transfer_syntax": h.transfer_syntax_uid[:64] or None,
        "rows": h.rows,
        "columns": h.columns,
    }
    return FileOut(frames=frames, facts=facts)


_WORKER_ARGS: tuple[bytes, int, ReadLimits, FundusRule] | None = None


def _worker_init(secret: bytes, image_size: int, limits: ReadLimits, rule: FundusRule) -> None:
    global _WORKER_ARGS
    _WORKER_ARGS = (secret, image_size, limits, rule)


def _worker_process(path: str) -> FileOut:
    assert _WORKER_ARGS is not None
    return process_file(path, *_WORKER_ARGS)


# ----------------------------------------------------------------------------- files and locking


@contextmanager
def site_lock(site: Site) -> Iterator[None]:
    """Exclusive per-site lock (released by the OS if the process dies, so a kill never leaves it stuck)."""
    import fcntl

    site.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(site.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise IngestError("another ingestion is running on this site; wait for it to finish") from exc
        yield
    finally:
        os.close(fd)


def discover_files(paths: Iterable[Path], exclude: Path | None = None) -> list[Path]:
    """Every regular file under `paths`, recursively, in a stable order; any name is fine. Site
    directories (site.toml + secret.key) are skipped: an export folder may hold the site itself."""
    out: list[Path] = []
    seen: set[Path] = set()
    excl = exclude.resolve() if exclude else None
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise IngestError(f"{p} does not exist; check the --dicom path")
        if p.is_file():
            rp = p.resolve()
            if rp not in seen:
                seen.add(rp)
                out.append(rp)
            continue
        for root, dirs, files in os.walk(p):
            r = Path(root).resolve()
            if (r / SITE_TOML).is_file() and (r / SECRET_FILE).is_file():
                dirs[:] = []  # a vilref site directory (ours or another): never ingest its files
                continue
            dirs[:] = sorted(d for d in dirs if excl is None or (r / d).resolve() != excl)
            for name in sorted(files):
                fp = (r / name).resolve()
                if fp.is_file() and fp not in seen and (excl is None or excl not in fp.parents):
                    seen.add(fp)
                    out.append(fp)
    return out


def display_path(path: Path) -> str:
    """A path as text that any database accepts (undecodable bytes shown as U+FFFD)."""
    return os.fsencode(path).decode("utf-8", "replace")


def image_relpath(image_key: str) -> str:
    return f"images/{image_key[:2]}/{image_key}.png"


def _write_atomic(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _cleanup_images(site: Site) -> int:
    """Remove temporary files and PNGs no row points to (left by a killed run). Runs under the lock."""
    images = site.images_dir
    if not images.is_dir():
        return 0
    with site.session() as s:
        known = {name for (name,) in s.execute(select(Image.file_name))}
    removed = 0
    for sub in images.iterdir():
        if not sub.is_dir():
            continue
        for f in sub.iterdir():
            rel = f"images/{sub.name}/{f.name}"
            if f.name.startswith(".tmp-") or (f.suffix == ".png" and rel not in known):
                f.unlink(missing_ok=True)
                removed += 1
    return removed


# ----------------------------------------------------------------------------- the image phase


@dataclass
class _Known:
    """Keys already in the database: (sop_key, frame) and pixel hash -> (image id, source file id)."""

    by_sop: dict[tuple[str, int], tuple[int, int]]
    by_pixels: dict[str, tuple[int, int]]
    files: dict[str, tuple[int, int, int]]  # path_key -> (source file id, size, mtime_ns)


def _load_known(site: Site) -> _Known:
    with site.session() as s:
        by_sop: dict[tuple[str, int], tuple[int, int]] = {}
        by_pixels: dict[str, tuple[int, int]] = {}
        for iid, sop, frame, key, sfid in s.execute(
            select(Image.id, Image.sop_key, Image.frame_index, Image.image_key, Image.source_file_id)
        ):
            by_sop[(sop, frame)] = (iid, sfid)
            by_pixels[key] = (iid, sfid)
        files = {
            pk: (sid, size, mt)
            for sid, pk, size, mt in s.execute(
                select(SourceFile.id, SourceFile.path_key, SourceFile.size, SourceFile.mtime_ns)
            )
        }
    return _Known(by_sop, by_pixels, files)


def _record_file(
    s: Any,
    site: Site,
    path: Path,
    st: os.stat_result,
    out: FileOut,
    run_id: int,
    known: _Known,
    counts: RunCounts,
) -> None:
    """Write one file's PNGs, then add its rows to the session (committed by the caller)."""
    path_key = site.key("path", os.fsencode(path))
    assert path_key is not None
    shown = display_path(path) if site.config.record_source_paths else None
    previous = known.files.get(path_key)
    if previous is not None:  # the file changed since it was recorded: replace its outcome
        sf = s.get(SourceFile, previous[0])
        s.execute(delete(Quarantine).where(Quarantine.source_file_id == sf.id))
        s.execute(delete(Duplicate).where(Duplicate.source_file_id == sf.id))
        sf.size, sf.mtime_ns, sf.path, sf.run_id = st.st_size, st.st_mtime_ns, shown, run_id
        sf.processed_at = datetime.now(UTC)
    else:
        sf = SourceFile(
            path_key=path_key,
            path=shown,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            outcome="quarantined",
            frames=0,
            run_id=run_id,
        )
        s.add(sf)
    s.flush()
    known.files[path_key] = (sf.id, st.st_size, st.st_mtime_ns)

    if out.rejection is not None:
        sf.outcome, sf.frames = "quarantined", 0
        s.add(Quarantine(source_file_id=sf.id, reason=out.rejection.reason, message=out.rejection.message))
        counts.quarantined[out.rejection.reason] += 1
        log.info("quarantined file %s: %s", path_key[:12], out.rejection.reason)
        return

    new = 0
    facts = out.facts
    for fr in out.frames:
        hit = known.by_sop.get((facts["sop_key"], fr.index))
        kind = "sop_instance"
        if hit is None:
            hit, kind = known.by_pixels.get(fr.image_key), "pixels"
        if hit is not None:
            if hit[1] == sf.id:  # re-reading a changed file that still holds this frame
                continue
            s.add(Duplicate(source_file_id=sf.id, frame_index=fr.index, kind=kind, image_id=hit[0]))
            counts.duplicates[kind] += 1
            continue
        rel = image_relpath(fr.image_key)
        _write_atomic(site.root / rel, fr.png)  # the file exists before any row points to it
        img = Image(
            image_key=fr.image_key, source_file_id=sf.id, frame_index=fr.index, file_name=rel, **facts
        )
        s.add(img)
        s.flush()
        known.by_sop[(facts["sop_key"], fr.index)] = (img.id, sf.id)
        known.by_pixels[fr.image_key] = (img.id, sf.id)
        new += 1
    sf.outcome = "accepted" if new else "duplicate"
    sf.frames = len(out.frames)
    counts.accepted += new


def _ingest_images(
    site: Site,
    files: list[Path],
    workers: int,
    run_id: int,
    counts: RunCounts,
    progress: ProgressSink | None,
    commit_every: int,
) -> None:
    known = _load_known(site)
    todo: list[tuple[Path, os.stat_result]] = []
    for p in files:
        try:
            st = p.stat()
        except OSError:
            continue
        path_key = site.key("path", os.fsencode(p))
        rec = known.files.get(path_key or "")
        if rec is not None and rec[1] == st.st_size and rec[2] == st.st_mtime_ns:
            counts.files_skipped += 1
        else:
            todo.append((p, st))
    if progress:
        progress.phase("images", len(files))
        if counts.files_skipped:
            progress.advance(counts.files_skipped)
    args = (site.hash_secret, site.config.image_size, site.config.read_limits(), site.config.fundus_rule())
    executor = None
    if workers > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=args,
        )
        results: Iterator[FileOut] = executor.map(_worker_process, [str(p) for p, _ in todo], chunksize=4)
    else:
        results = (process_file(str(p), *args) for p, _ in todo)
    s = site.session()
    pending, last_commit = 0, time.monotonic()
    try:
        for (path, st), out in zip(todo, results, strict=True):
            _record_file(s, site, path, st, out, run_id, known, counts)
            counts.files_processed += 1
            pending += 1
            if pending >= commit_every or time.monotonic() - last_commit > 2.0:
                s.commit()
                pending, last_commit = 0, time.monotonic()
            if progress:
                progress.advance()
        s.commit()
    except BaseException:
        s.rollback()
        raise
    finally:
        s.close()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- the report phase


def _label_states(text: str, eye: str | None) -> tuple[list[str], list[str], list[str], list[int], str]:
    from vilref_fed.labels import LabelPolicy, get_extractor
    from vilref_fed.ontology import load_ontology

    ontology = load_ontology()
    labels = get_extractor().extract(text, eye if eye in ("OD", "OS") else None)
    vector = LabelPolicy().vector(labels, ontology.label_ids)
    return (
        list(labels.positive),
        list(labels.uncertain),
        list(labels.negated),
        [int(v) for v in vector],
        ontology.hash,
    )


def _report_key(site: Site, row: ReportRow, link_by: str) -> str | None:
    if row.report_id:
        return site.key("report", "id:" + row.report_id)
    value = row.accession if link_by == "accession" else row.study_uid
    return site.key("report", f"{link_by}:{(value or '').strip()}|{row.eye or ''}")


def _ingest_reports(site: Site, parsed: ReportsFile, link_by: str, run_id: int, counts: RunCounts) -> None:
    import hashlib

    source_key = site.key("source", os.fsencode(parsed.path.resolve()))
    assert source_key is not None
    source_name = display_path(parsed.path) if site.config.record_source_paths else None
    with site.session() as s, s.begin():
        s.execute(delete(ReportIssue).where(ReportIssue.source_key == source_key))
        issues = [(i.line, i.kind, i.message) for i in parsed.issues]
        existing = {
            k: (rid, sha)
            for rid, k, sha in s.execute(select(Report.id, Report.report_key, Report.text_sha256))
        }
        seen: set[str] = set()
        for row in parsed.rows:
            counts.report_rows += 1
            key = _report_key(site, row, link_by)
            assert key is not None
            if key in seen:
                issues.append(
                    (row.line, "duplicate_report", "same report key as an earlier row of this file; skipped")
                )
                continue
            seen.add(key)
            sha = hashlib.sha256(row.text.encode("utf-8")).hexdigest()
            prev = existing.get(key)
            if prev is not None and prev[1] == sha:
                counts.reports_unchanged += 1
                continue
            pos, unc, neg, vec, onto = _label_states(row.text, row.eye)
            fields = dict(
                source_key=source_key,
                source_name=source_name,
                line=row.line,
                accession_key=site.key("accession", row.accession),
                study_key=site.key("study", row.study_uid),
                eye=row.eye,
                text=row.text,
                text_sha256=sha,
                positive=pos,
                uncertain=unc,
                negated=neg,
                label_vector=vec,
                ontology_hash=onto,
            )
            if prev is None:
                rep = Report(report_key=key, **fields)
                s.add(rep)
                s.flush()
                existing[key] = (rep.id, sha)
                counts.reports_new += 1
            else:  # corrected text: update it and drop its links so they are recomputed
                rep = s.get(Report, prev[0])
                for k, v in fields.items():
                    setattr(rep, k, v)
                rep.updated_at = datetime.now(UTC)
                s.execute(delete(ImageReport).where(ImageReport.report_id == rep.id))
                existing[key] = (rep.id, sha)
                counts.reports_updated += 1
        for line, kind, message in issues:
            s.add(
                ReportIssue(
                    source_key=source_key,
                    source_name=source_name,
                    line=line,
                    kind=kind,
                    message=message,
                    run_id=run_id,
                )
            )
            counts.report_issues[kind] += 1


def relink(site: Site, link_by: str, counts: RunCounts | None = None) -> None:
    """Recompute which report describes each image (set-based, so any order of inputs gives one result).

    An image takes the report of its accession (or study) written for its eye, else one for both eyes,
    else one without an eye; ties go to the earliest report. Label states are extracted for the
    image's eye, so a report with per-eye sections gives each eye its own labels.
    """
    from vilref_fed.ontology import load_ontology

    onto_hash = load_ontology().hash
    counts = counts if counts is not None else RunCounts()
    col = Image.accession_key if link_by == "accession" else Image.study_key
    rcol = Report.accession_key if link_by == "accession" else Report.study_key
    with site.session() as s, s.begin():
        by_key: dict[str, list[tuple[int, str | None]]] = {}
        for rid, k, eye in s.execute(select(Report.id, rcol, Report.eye).order_by(Report.id)):
            if k:
                by_key.setdefault(k, []).append((rid, eye))
        desired: dict[int, tuple[int, str | None]] = {}
        for iid, k, lat in s.execute(select(Image.id, col, Image.laterality)):
            cands = by_key.get(k or "")
            if not cands:
                continue
            img_eye = _EYE_OF_LATERALITY.get(lat or "")
            best: tuple[int, int, str | None] | None = None
            for rid, r_eye in cands:
                if r_eye in ("OD", "OS"):
                    if r_eye != img_eye:
                        continue
                    prio = 0
                else:
                    prio = 1 if r_eye == "OU" else 2
                if best is None or prio < best[0]:
                    best = (prio, rid, r_eye if r_eye in ("OD", "OS") else img_eye)
            if best is not None:
                desired[iid] = (best[1], best[2])
        current = {
            iid: (rid, eye, oh)
            for iid, rid, eye, oh in s.execute(
                select(
                    ImageReport.image_id, ImageReport.report_id, ImageReport.eye, ImageReport.ontology_hash
                )
            )
        }
        stale = [
            iid
            for iid, (rid, eye, oh) in current.items()
            if desired.get(iid) != (rid, eye) or oh != onto_hash
        ]
        for i in range(0, len(stale), 500):
            s.execute(delete(ImageReport).where(ImageReport.image_id.in_(stale[i : i + 500])))
        counts.links_removed += len(stale)
        stale_set = set(stale)
        to_add = {iid: v for iid, v in desired.items() if iid not in current or iid in stale_set}
        needed = sorted({rid for rid, _ in to_add.values()})
        texts: dict[int, str] = {}
        for i in range(0, len(needed), 500):
            for rid, text in s.execute(
                select(Report.id, Report.text).where(Report.id.in_(needed[i : i + 500]))
            ):
                texts[rid] = text
        cache: dict[tuple[int, str | None], tuple[list[str], list[str], list[str], list[int], str]] = {}
        for iid, (rid, eye) in sorted(to_add.items()):
            if (rid, eye) not in cache:
                cache[(rid, eye)] = _label_states(texts[rid], eye)
            pos, unc, neg, vec, oh = cache[(rid, eye)]
            s.add(
                ImageReport(
                    image_id=iid,
                    report_id=rid,
                    eye=eye,
                    positive=pos,
                    uncertain=unc,
                    negated=neg,
                    label_vector=vec,
                    ontology_hash=oh,
                )
            )
        counts.links_added += len(to_add)


# ----------------------------------------------------------------------------- status and listings


def site_status(site: Site) -> dict[str, Any]:
    """Site totals. The first six keys are the documented `status --json` contract."""
    from vilref_fed.ontology import load_ontology

    with site.session() as s:
        accepted = s.scalar(select(func.count()).select_from(Image)) or 0
        quarantined = dict(
            s.execute(
                select(Quarantine.reason, func.count())
                .group_by(Quarantine.reason)
                .order_by(Quarantine.reason)
            ).all()
        )
        dup_kinds = dict(s.execute(select(Duplicate.kind, func.count()).group_by(Duplicate.kind)).all())
        reports_total = s.scalar(select(func.count()).select_from(Report)) or 0
        reports_linked = s.scalar(select(func.count(func.distinct(ImageReport.report_id)))) or 0
        linked_images = s.scalar(select(func.count()).select_from(ImageReport)) or 0
        issues = dict(
            s.execute(
                select(ReportIssue.kind, func.count()).group_by(ReportIssue.kind).order_by(ReportIssue.kind)
            ).all()
        )
        label_ids = load_ontology().label_ids
        label_counts = dict.fromkeys(label_ids, 0)
        for (vec,) in s.execute(select(ImageReport.label_vector)):
            for lid, v in zip(label_ids, vec or [], strict=False):
                if v:
                    label_counts[lid] += 1
        groups: dict[str, int] = {}
        for pk, sk, ik in s.execute(select(Image.patient_key, Image.study_key, Image.image_key)):
            g = pk or sk or ik
            groups[g] = groups.get(g, 0) + 1
        files = s.scalar(select(func.count()).select_from(SourceFile)) or 0
    split = {"train": 0, "val": 0}
    for g, n in groups.items():
        split[patient_split(g, float(site.config.val_fraction))] += n
    return {
        "accepted": accepted,
        "quarantined": quarantined,
        "duplicates": sum(dup_kinds.values()),
        "reports_linked": reports_linked,
        "reports_orphan": reports_total - reports_linked,
        "images_without_report": accepted - linked_images,
        "duplicates_by_kind": dict(sorted(dup_kinds.items())),
        "reports_total": reports_total,
        "report_issues": issues,
        "files_recorded": files,
        "patients": len(groups),
        "split_images": split,
        "label_counts": {k: v for k, v in label_counts.items() if v},
    }


def _shown(path: str | None, key: str) -> str:
    return path if path is not None else f"<path hash {key[:16]}>"


def quarantine_list(site: Site, reason: str | None = None) -> list[dict[str, str]]:
    """[{"path", "reason", "message"}] in ingestion order."""
    q = (
        select(SourceFile.path, SourceFile.path_key, Quarantine.reason, Quarantine.message)
        .join(SourceFile, SourceFile.id == Quarantine.source_file_id)
        .order_by(Quarantine.id)
    )
    if reason:
        q = q.where(Quarantine.reason == reason)
    with site.session() as s:
        return [{"path": _shown(p, k), "reason": r, "message": m} for p, k, r, m in s.execute(q)]


def list_problems(site: Site) -> dict[str, list[dict[str, Any]]]:
    """Report rows not ingested, reports without an image, images without a report: file and line each."""
    with site.session() as s:
        issues = [
            {"file": _shown(n, k), "line": line, "kind": kind, "message": msg}
            for n, k, line, kind, msg in s.execute(
                select(
                    ReportIssue.source_name,
                    ReportIssue.source_key,
                    ReportIssue.line,
                    ReportIssue.kind,
                    ReportIssue.message,
                ).order_by(ReportIssue.source_key, ReportIssue.line)
            )
        ]
        linked = select(ImageReport.report_id)
        orphans = [
            {"file": _shown(n, k), "line": line}
            for n, k, line in s.execute(
                select(Report.source_name, Report.source_key, Report.line)
                .where(Report.id.not_in(linked))
                .order_by(Report.source_key, Report.line)
            )
        ]
        unlinked = [
            {"file": _shown(p, k), "frame": frame, "image": key[:16]}
            for p, k, frame, key in s.execute(
                select(SourceFile.path, SourceFile.path_key, Image.frame_index, Image.image_key)
                .join(SourceFile, SourceFile.id == Image.source_file_id)
                .where(Image.id.not_in(select(ImageReport.image_id)))
                .order_by(Image.id)
            )
        ]
    return {"report_issues": issues, "reports_orphan": orphans, "images_without_report": unlinked}


# ----------------------------------------------------------------------------- entry point


def _parse_reports(paths: Sequence[Path], encoding: str, link_by: str) -> list[ReportsFile]:
    parsed = []
    for p in paths:
        try:
            parsed.append(read_reports_csv(p, encoding=encoding, link_by=link_by))
        except ReportsCsvError as exc:
            raise IngestError(str(exc)) from exc
    return parsed


def ingest(site: Site, options: IngestOptions, progress: ProgressSink | None = None) -> IngestResult:
    """Run one ingestion. Whole-input problems raise IngestError before anything is written;
    KeyboardInterrupt leaves committed files committed (rerun to finish)."""
    link_by = options.link_by or site.config.link_by
    if link_by not in LINK_MODES:
        raise IngestError(f"--link must be one of {', '.join(LINK_MODES)}")
    encoding = options.encoding or site.config.report_encoding
    workers = max(1, options.workers or site.config.workers)
    if not options.dicom and not options.reports:
        raise IngestError("nothing to ingest: give --dicom PATH and/or --reports REPORTS.csv")
    parsed = _parse_reports(options.reports, encoding, link_by)  # fail fast, before any write
    files = discover_files(options.dicom, exclude=site.root) if options.dicom else []
    report_files = {Path(p).resolve() for p in options.reports}
    files = [f for f in files if f not in report_files]  # a CSV inside the export folder is not a DICOM
    counts = RunCounts(files_found=len(files))
    with site_lock(site):
        with site.session() as s, s.begin():
            run = IngestRun(status="running")
            s.add(run)
            s.flush()
            run_id = run.id
        log.info("ingest run %d: %d files, %d report files", run_id, len(files), len(parsed))
        status = "interrupted"
        try:
            counts.orphan_pngs_removed = _cleanup_images(site)
            if files:
                _ingest_images(site, files, workers, run_id, counts, progress, options.commit_every)
            if parsed and progress:
                progress.phase("reports", len(parsed))
            for rf in parsed:
                _ingest_reports(site, rf, link_by, run_id, counts)
                if progress:
                    progress.advance()
            relink(site, link_by, counts)
            status = "finished"
        except KeyboardInterrupt:
            log.warning("ingest run %d interrupted after %d files", run_id, counts.files_processed)
            raise
        finally:
            with site.session() as s, s.begin():
                run_row = s.get(IngestRun, run_id)
                if run_row is not None:
                    run_row.status, run_row.finished_at, run_row.counts = (
                        status,
                        datetime.now(UTC),
                        counts.to_dict(),
                    )
            log.info("ingest run %d %s: %s", run_id, status, counts.to_dict())
    return IngestResult(run=counts, status=site_status(site))
