"""Whole files: a reports CSV -> a labels JSONL (DESIGN §3.3), and counts over a labels JSONL.

Errors are `ReportsFileError` with a one-line message naming the file, line and what to do; they never
quote report text. The output is written to a temporary file and renamed into place only when the whole
input was read, so a bad row never leaves a half-written or clobbered OUT.jsonl behind.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vilref_fed.labels.extractor import LabelExtractor, normalise_eye

REQUIRED_COLUMNS = ("report_id", "report")
_FIELD_LIMIT = 16 * 1024 * 1024  # one report may be long, but not unbounded


class ReportsFileError(ValueError):
    """The input file cannot be used as it is; the message says where and how to fix it."""


@dataclass
class ExtractSummary:
    rows: int = 0
    labelled: int = 0  # rows with at least one positive or uncertain label
    empty_reports: int = 0
    unknown_eye: int = 0
    seconds: float = 0.0
    label_counts: Counter = field(default_factory=Counter)


def _first_bad_byte(path: Path) -> tuple[int, int]:
    """(line, byte offset) of the first byte sequence that is not UTF-8, found by a second pass."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    line, offset = 1, 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 16):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                # the decoder may hold up to 3 bytes of a previous chunk; count lines in what it accepted
                pos = max(exc.start, 0)
                return line + chunk[:pos].count(b"\n"), offset + pos
            line += chunk.count(b"\n")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return line, offset
    return line, offset


def _open_text(path: Path) -> io.TextIOWrapper:
    try:
        raw = path.open("rb")
    except FileNotFoundError:
        raise ReportsFileError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise ReportsFileError(f"{path} is a directory; give the reports CSV file") from None
    except PermissionError:
        raise ReportsFileError(f"{path}: permission denied; make the file readable for this user") from None
    except OSError as exc:
        raise ReportsFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline="")


def iter_reports(
    path: Path, eye_column: str | None = "eye", eye_required: bool = False
) -> Iterator[tuple[str, str, str | None, int]]:
    """(report_id, report, raw eye value or None, byte position) for each row of a reports CSV."""
    path = Path(path)
    csv.field_size_limit(max(csv.field_size_limit(), _FIELD_LIMIT))
    fh = _open_text(path)
    try:
        reader = csv.reader(fh, strict=True)
        try:
            header = next(reader, None)
        except UnicodeDecodeError:
            line, off = _first_bad_byte(path)
            raise ReportsFileError(
                f"{path}: line {line} (byte {off}) is not UTF-8 text; re-export the file as UTF-8"
            ) from None
        except csv.Error as exc:
            raise ReportsFileError(f"{path}: the header line is not valid CSV ({exc})") from None
        if header is None:
            raise ReportsFileError(f"{path} is empty; it needs a header line with columns report_id,report")
        names = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            found = ", ".join(n for n in names if n) or "none"
            raise ReportsFileError(
                f"{path}: missing column(s) {', '.join(missing)} (found: {found}); the CSV needs a header "
                "with report_id and report"
            )
        if eye_column and eye_column not in names and eye_required:
            raise ReportsFileError(
                f"{path}: no column {eye_column!r} for --eye-column (found: {', '.join(names)})"
            )
        i_id, i_rep = names.index("report_id"), names.index("report")
        i_eye = names.index(eye_column) if eye_column and eye_column in names else None
        width = len(names)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                line, off = _first_bad_byte(path)
                raise ReportsFileError(
                    f"{path}: line {line} (byte {off}) is not UTF-8 text; re-export the file as UTF-8"
                ) from None
            except csv.Error as exc:
                raise ReportsFileError(
                    f"{path}: line {reader.line_num} is not valid CSV ({exc}); check its quoting"
                ) from None
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) != width:
                raise ReportsFileError(
                    f"{path}: line {reader.line_num} has {len(row)} fields but the header has {width}; "
                    "quote report text that contains commas"
                )
            eye = row[i_eye] if i_eye is not None else None
            yield row[i_id], row[i_rep], eye, fh.buffer.tell()
    finally:
        fh.close()


def extract_file(
    csv_path: Path,
    out_path: Path,
    extractor: LabelExtractor,
    eye_column: str | None = "eye",
    eye_required: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExtractSummary:
    """Label every row of a reports CSV into a JSONL file (one object per row, same order)."""
    csv_path, out_path = Path(csv_path), Path(out_path)
    out_dir = out_path.parent if str(out_path.parent) else Path(".")
    if not out_dir.is_dir():
        raise ReportsFileError(f"{out_dir} does not exist; create the output directory first")
    if out_path.is_dir():
        raise ReportsFileError(f"{out_path} is a directory; give a file name such as labels.jsonl")
    summary = ExtractSummary()
    t0 = time.perf_counter()
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_dir)
    except OSError as exc:
        raise ReportsFileError(f"cannot write to {out_dir} ({exc.strerror or exc})") from None
    tmp = Path(tmp_name)
    ids = extractor.ontology.label_ids
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            dumps = json.dumps
            extract = extractor.extract
            for report_id, text, raw_eye, pos in iter_reports(csv_path, eye_column, eye_required):
                eye = None
                if raw_eye is not None and raw_eye.strip():
                    try:
                        eye = normalise_eye(raw_eye)
                    except ValueError:
                        summary.unknown_eye += 1
                if not text.strip():
                    summary.empty_reports += 1
                labels = extract(text, eye)
                out.write(dumps(labels.to_json_dict(report_id), ensure_ascii=False))
                out.write("\n")
                summary.rows += 1
                if labels.positive or labels.uncertain:
                    summary.labelled += 1
                    summary.label_counts.update(labels.positive)
                    summary.label_counts.update(labels.uncertain)
                if progress is not None and summary.rows % 2048 == 0:
                    progress(pos, summary.rows)
        os.replace(tmp, out_path)
    except ReportsFileError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:  # disk full, file vanished, permission changed mid-run
        tmp.unlink(missing_ok=True)
        raise ReportsFileError(
            f"reading {csv_path.name} or writing {out_path} failed ({exc.strerror or exc}); "
            f"{out_path} was left as it was"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    summary.seconds = time.perf_counter() - t0
    summary.label_counts = Counter({k: summary.label_counts[k] for k in ids if summary.label_counts[k]})
    return summary


@dataclass
class LabelStats:
    reports: int = 0
    unlabelled: int = 0  # no positive or uncertain label
    counts: dict[str, Counter] = field(default_factory=dict)  # label -> Counter of states
    unknown_labels: list[str] = field(default_factory=list)


def label_stats(path: Path, label_ids: tuple[str, ...]) -> LabelStats:
    """Counts per label and state over a labels JSONL written by `extract_file`."""
    path = Path(path)
    stats = LabelStats(counts={lab: Counter() for lab in label_ids})
    known = set(label_ids)
    try:
        fh = path.open("r", encoding="utf-8")
    except FileNotFoundError:
        raise ReportsFileError(f"{path}: no such file; run `vilref-client labels extract` first") from None
    except IsADirectoryError:
        raise ReportsFileError(f"{path} is a directory; give the labels JSONL file") from None
    except OSError as exc:
        raise ReportsFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    with fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, 1):  # noqa: B007 (lineno is reported after the loop)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise ReportsFileError(
                        f"{path}: line {lineno} is not JSON; expected one object per line as written by "
                        "`vilref-client labels extract`"
                    ) from None
                if not isinstance(obj, dict) or not all(
                    isinstance(obj.get(k), list) for k in ("positive", "uncertain", "negated")
                ):
                    raise ReportsFileError(
                        f"{path}: line {lineno} lacks the lists positive/uncertain/negated; "
                        "is this a labels file?"
                    )
                stats.reports += 1
                if not obj["positive"] and not obj["uncertain"]:
                    stats.unlabelled += 1
                for state in ("positive", "uncertain", "negated"):
                    for lab in obj[state]:
                        lab = str(lab)
                        if lab not in known:
                            if lab not in stats.unknown_labels:
                                stats.unknown_labels.append(lab)
                            stats.counts.setdefault(lab, Counter())
                        stats.counts[lab][state] += 1
        except UnicodeDecodeError:
            raise ReportsFileError(f"{path}: line {lineno + 1} is not UTF-8 text") from None
    return stats
