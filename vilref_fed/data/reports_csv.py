"""Reading report exports (CSV) without guessing.

Hospital report dumps are messy: stray quotes, extra commas, empty reports, GB18030 files. The rules:
- the whole file is decoded strictly with the given encoding; bytes that do not decode are a clear
  error naming `--encoding`, never replacement characters inside a report;
- a row whose field count differs from the header is skipped and listed with its file and line, never
  "repaired" by merging or splitting fields; if such a row swallowed several physical lines (an
  unbalanced quote), parsing restarts on the line after its first one, so one bad row never costs the
  rows after it;
- report text is kept exactly as read (line breaks, quotes, spaces);
- messages name files, lines and column names, never cell values (they may be patient data).
"""

from __future__ import annotations

import csv
import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "report": ("report", "report_text", "text"),
    "accession": ("accession", "accession_number", "accessionnumber", "acc"),
    "study_uid": ("study_uid", "study_instance_uid", "studyinstanceuid", "study"),
    "eye": ("eye", "laterality"),
    "report_id": ("report_id", "reportid"),
}
_EYES = {
    "OD": ("OD", "R", "RE", "RIGHT", "RIGHT EYE", "右", "右眼"),
    "OS": ("OS", "L", "LE", "LEFT", "LEFT EYE", "左", "左眼"),
    "OU": ("OU", "B", "BE", "BOTH", "BOTH EYES", "双", "双眼"),
}
EYE_VALUES: dict[str, str] = {alias: eye for eye, aliases in _EYES.items() for alias in aliases}
ISSUE_KINDS = ("malformed_row", "empty_report", "missing_key", "bad_eye", "nul_character")
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class ReportsCsvError(ValueError):
    """The file as a whole cannot be read (encoding, missing columns); the message says what to do."""


@dataclass(frozen=True)
class ReportRow:
    """One usable report. `line` is the 1-based physical line where its record starts."""

    source: Path
    line: int
    report_id: str | None
    accession: str | None
    study_uid: str | None
    eye: str | None  # "OD" | "OS" | "OU" | None
    text: str

    def __repr__(self) -> str:  # never print identifiers or text
        return f"ReportRow({self.source.name}:{self.line}, eye={self.eye}, {len(self.text)} chars)"


@dataclass(frozen=True)
class CsvIssue:
    source: Path
    line: int
    kind: str
    message: str


@dataclass
class ReportsFile:
    path: Path
    columns: tuple[str, ...]
    rows: list[ReportRow] = field(default_factory=list)
    issues: list[CsvIssue] = field(default_factory=list)
    records: int = 0


def _normalise(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def decode_report_bytes(data: bytes, path: Path, encoding: str) -> str:
    """Strict decoding; a UTF-8 BOM is dropped. The error names the option that fixes it."""
    try:
        codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
        return data.decode(codec, errors="strict")
    except LookupError as exc:
        raise ReportsCsvError(
            f"unknown encoding {encoding!r}; pass a Python codec name, e.g. --encoding gb18030"
        ) from exc
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ReportsCsvError(
            f"{path.name} is not valid {encoding} (byte 0x{data[exc.start]:02x} at line {line}); "
            "if it was exported in another encoding, rerun with --encoding ENCODING "
            "(Chinese exports are often --encoding gb18030)"
        ) from exc


def read_reports_csv(path: str | Path, encoding: str = "utf-8", link_by: str = "accession") -> ReportsFile:
    """Parse a report CSV into rows and per-line issues. Raises ReportsCsvError for whole-file problems."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise ReportsCsvError(f"reports file {p} not found") from exc
    except IsADirectoryError as exc:
        raise ReportsCsvError(f"{p} is a folder; --reports takes a CSV file") from exc
    except OSError as exc:
        raise ReportsCsvError(f"cannot read {p}: {exc.strerror}") from exc
    text = decode_report_bytes(data, p, encoding)
    lines = _LINE.findall(text)
    if not lines:
        raise ReportsCsvError(f"{p.name} is empty; expected a header line with a 'report' column")

    header_reader = csv.reader([lines[0]])
    try:
        header = [_normalise(h) for h in next(header_reader)]
    except (StopIteration, csv.Error) as exc:
        raise ReportsCsvError(f"{p.name}: cannot read the header line") from exc
    index: dict[str, int] = {}
    for role, aliases in COLUMN_ALIASES.items():
        for i, name in enumerate(header):
            if name in aliases:
                index.setdefault(role, i)
    if "report" not in index:
        raise ReportsCsvError(
            f"{p.name} has no report column (columns: {', '.join(header)}); name the text column 'report'"
        )
    need = "accession" if link_by == "accession" else "study_uid"
    if need not in index:
        other = "--link study" if link_by == "accession" else "--link accession"
        raise ReportsCsvError(
            f"{p.name} has no {need} column to link reports to images by (columns: {', '.join(header)}); "
            f"add it, or use {other}"
        )
    result = ReportsFile(path=p, columns=tuple(header))
    ncols = len(header)

    def cell(rec: list[str], role: str) -> str | None:
        i = index.get(role)
        if i is None:
            return None
        v = rec[i].strip()
        return v or None

    i = 1  # index of the physical line where the next record starts
    while i < len(lines):
        reader = csv.reader(itertools.islice(lines, i, None))
        consumed = 0
        restart: int | None = None
        try:
            for rec in reader:
                first, last = i + consumed, i + reader.line_num - 1
                consumed = reader.line_num
                line_no = first + 1
                if not rec or all(not f.strip() for f in rec):
                    continue
                result.records += 1
                if last > first and "".join(lines[first : last + 1]).count('"') % 2 == 1:
                    # An opening quote never closed: the csv module swallowed the lines after it.
                    result.issues.append(
                        CsvIssue(p, line_no, "malformed_row", "unbalanced quote; row skipped")
                    )
                    restart = first + 1
                    break
                if len(rec) != ncols:
                    span = f" (record spans lines {line_no}-{last + 1})" if last > first else ""
                    result.issues.append(
                        CsvIssue(
                            p,
                            line_no,
                            "malformed_row",
                            f"{len(rec)} fields, header has {ncols}{span}; skipped",
                        )
                    )
                    if last > first:
                        restart = first + 1
                        break
                    continue
                body = rec[index["report"]]
                eye_raw = cell(rec, "eye")
                eye = None
                if eye_raw is not None:
                    eye = EYE_VALUES.get(" ".join(eye_raw.upper().split()))
                    if eye is None:
                        result.issues.append(
                            CsvIssue(p, line_no, "bad_eye", "eye value is not OD/OS/OU (R/L/B); row skipped")
                        )
                        continue
                key = cell(rec, need)
                if key is None:
                    result.issues.append(CsvIssue(p, line_no, "missing_key", f"empty {need}; row skipped"))
                    continue
                if "\x00" in body:  # binary junk; PostgreSQL text cannot hold it either
                    result.issues.append(
                        CsvIssue(p, line_no, "nul_character", "NUL byte in the report; row skipped")
                    )
                    continue
                if not body.strip():
                    result.issues.append(
                        CsvIssue(p, line_no, "empty_report", "empty report text; row skipped")
                    )
                    continue
                result.rows.append(
                    ReportRow(
                        source=p,
                        line=line_no,
                        report_id=cell(rec, "report_id"),
                        accession=cell(rec, "accession"),
                        study_uid=cell(rec, "study_uid"),
                        eye=eye,
                        text=body,
                    )
                )
        except csv.Error as exc:
            first = i + consumed
            result.records += 1
            result.issues.append(
                CsvIssue(p, first + 1, "malformed_row", f"unreadable CSV record ({exc}); skipped")
            )
            restart = first + 1
        if restart is None:
            break
        i = restart
    return result
