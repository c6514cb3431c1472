"""End-to-end ingestion through the real CLI: a messy export of real DICOM files (OP files built from the
scikit-image fundus photograph in every supported syntax, every broken kind, duplicates, names with
spaces and non-ASCII characters) plus a report CSV with every kind of bad row.

Each case ends in the expected summary-table row, `status --json` count and `quarantine list` entry,
with exit code 0.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import BAD_KINDS, GOOD_KINDS, identity, with_new_uid, write_dicom
from PIL import Image
from typer.testing import CliRunner

from client.cli import app

SIZE = 80
N_GOOD = len(GOOD_KINDS)
runner = CliRunner()


def cli(*args: str, code: int = 0):
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    if code == 0:
        assert "Traceback" not in result.stdout + result.stderr
    return result


def table_row(output: str, label: str) -> list[str]:
    """The cells after `label` in a rich table row of `output`."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)]
        cells = [c for c in cells if c != ""]
        if cells and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no table row {label!r} in:\n{output}")


# Report sentences are distinctive so the privacy test can grep for them.
def report_text(i: int) -> str:
    return f"Moderate non-proliferative diabetic retinopathy with dot haemorrhages near arcade {i}."


OD_TEXT = (
    'Right eye: "cotton wool spots" and proliferative diabetic retinopathy.\r\n'
    "Neovascularisation at the disc."
)
ORPHAN_TEXT = "Tessellated fundus, no other abnormality seen in this orphan study."


def build_export(root: Path) -> dict:
    """The export folder and report CSV; returns what ingestion must find."""
    dcm = root / "PACS Export Ärzte"
    files: dict[str, str] = {}  # file -> expected outcome
    for i, kind in enumerate(sorted(GOOD_KINDS)):
        p = write_dicom(
            dcm / f"患者 {i:02d}" / f"IMG {i} ({kind}).dcm", kind, identity(i, "R" if i % 2 else "L"), SIZE, i
        )
        files[str(p)] = "accepted"
    # The other eye of study 0 (has its own per-eye report) and an image whose study has no report.
    p = write_dicom(dcm / "患者 00" / "IMG second eye", "jpeg_ybr422", identity(0, "R"), SIZE, 50)
    files[str(p)] = "accepted"
    p = write_dicom(dcm / "no report" / "IMG 20.dcm", "rle", identity(20, "L"), SIZE, 20)
    files[str(p)] = "accepted"
    for j, kind in enumerate(sorted(BAD_KINDS)):
        p = write_dicom(dcm / "broken" / f"{kind} file.dcm", kind, identity(40 + j), SIZE, 40 + j)
        files[str(p)] = BAD_KINDS[kind]
    p = write_dicom(dcm / "broken" / "skin photo.dcm", "vl_photo_skin", identity(60), SIZE, 60)
    files[str(p)] = "wrong_modality"
    (dcm / "notes.txt").write_text("export log: 42 studies\n")
    files[str(dcm / "notes.txt")] = "not_dicom"
    # Duplicates: a plain copy (same SOP Instance UID) and a re-export with a new UID, same pixels.
    first = dcm / "患者 00" / f"IMG 0 ({sorted(GOOD_KINDS)[0]}).dcm"
    shutil.copy(first, dcm / "zz copy of IMG 0.dcm")
    files[str(dcm / "zz copy of IMG 0.dcm")] = "duplicate"
    src = identity(0, "L")
    p = write_dicom(dcm / "zz reexport.dcm", sorted(GOOD_KINDS)[0], with_new_uid(src), SIZE, 0)
    files[str(p)] = "duplicate"

    rows = ["report_id,accession,eye,report"]

    def add(row: str, tag: str) -> None:
        rows.append(row)

    for i in range(N_GOOD):
        add(f'R{i},ACCQX{i:06d},,"{report_text(i)}"', f"r{i}")
        if i == 2:
            add("R90,ACCQX000090,OD,too,many,fields", "malformed")
        if i == 4:
            add('R91,ACCQX000091,OS,"this quote is never closed', "unbalanced")
        if i == 6:
            add("R92,ACCQX000092,,   ", "empty")
        if i == 7:
            add("R93,ACCQX000093,XYZ,Normal fundus.", "bad_eye")
        if i == 8:
            add("R94,,OD,Normal fundus.", "missing_key")
    add('R0OD,ACCQX000000,OD,"' + OD_TEXT.replace('"', '""') + '"', "od")
    add(f'R95,ACCQX000095,,"{ORPHAN_TEXT}"', "orphan")
    add(f'R3,ACCQX000003,,"{report_text(3)}"', "duplicate_report")
    csv_path = root / "reports export.csv"
    csv_path.write_bytes(("\n".join(rows) + "\n").encode("utf-8"))
    return {"dicom": dcm, "csv": csv_path, "files": files}


def _physical_lines(csv_path: Path) -> dict[str, int]:
    """Line of each report id, counted independently from the raw bytes."""
    out = {}
    for n, raw in enumerate(csv_path.read_bytes().split(b"\n"), start=1):
        head = raw.split(b",", 1)[0].decode()
        if head.startswith("R") and head not in out:
            out[head] = n
    return out


EXPECTED_QUARANTINE = {
    "truncated": 2,
    "no_pixel_data": 1,
    "wrong_modality": 2,
    "size_mismatch": 1,
    "absurd_dimensions": 1,
    "decode_failure": 1,
    "not_dicom": 2,
}
EXPECTED_ACCEPTED = sum(GOOD_KINDS.values()) + 2


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ingest")
    export = build_export(root)
    site = root / "site"
    cli("init", "--site-dir", str(site), "--name", "St Example Eye Clinic")
    first = cli(
        "ingest", "--site-dir", str(site), "--dicom", str(export["dicom"]), "--reports", str(export["csv"])
    )
    return {**export, "site": site, "first": first}


def test_summary_table_rows(ingested: dict) -> None:
    out = ingested["first"].stdout
    assert table_row(out, "accepted") == [str(EXPECTED_ACCEPTED), str(EXPECTED_ACCEPTED)]
    assert table_row(out, "duplicates") == ["2", "2"]
    for reason, n in EXPECTED_QUARANTINE.items():
        assert table_row(out, f"quarantined: {reason}") == [str(n), str(n)], reason
    assert table_row(out, "reports linked") == ["11"]
    assert table_row(out, "reports without an image") == ["1"]
    assert table_row(out, "images without a report") == ["1"]
    assert table_row(out, "report rows skipped: malformed_row") == ["2", "2"]
    for kind in ("empty_report", "bad_eye", "missing_key", "duplicate_report"):
        assert table_row(out, f"report rows skipped: {kind}") == ["1", "1"], kind
    assert int(table_row(out, "diabetic_retinopathy")[0]) >= N_GOOD
    # Progress bar drawn (on stderr), and the problems are listed with file and line.
    assert "images" in ingested["first"].stderr
    lines = _physical_lines(ingested["csv"])
    listing = ingested["first"].stdout
    for rid, kind in (
        ("R90", "malformed_row"),
        ("R91", "malformed_row"),
        ("R92", "empty_report"),
        ("R93", "bad_eye"),
        ("R94", "missing_key"),
    ):
        assert f"reports export.csv:{lines[rid]}: {kind}" in listing, (rid, kind)
    assert f"reports export.csv:{lines['R95']}" in listing  # the orphan report
    assert "IMG 20.dcm" in listing  # the image without a report


def test_status_json_counts(ingested: dict) -> None:
    st = json.loads(cli("status", "--site-dir", str(ingested["site"]), "--json").stdout)
    assert st["accepted"] == EXPECTED_ACCEPTED
    assert st["quarantined"] == EXPECTED_QUARANTINE
    assert st["duplicates"] == 2
    assert st["reports_linked"] == 11
    assert st["reports_orphan"] == 1
    assert st["images_without_report"] == 1
    assert st["split_images"]["train"] + st["split_images"]["val"] == EXPECTED_ACCEPTED
    text = cli("status", "--site-dir", str(ingested["site"])).stdout
    assert table_row(text, "accepted") == [str(EXPECTED_ACCEPTED)]


def test_quarantine_list_names_every_bad_file(ingested: dict) -> None:
    rows = json.loads(cli("quarantine", "list", "--site-dir", str(ingested["site"]), "--json").stdout)
    assert all(set(r) == {"path", "reason", "message"} for r in rows)
    got = {r["path"]: r["reason"] for r in rows}
    want = {p: o for p, o in ingested["files"].items() if o not in ("accepted", "duplicate")}
    assert got == want
    only = json.loads(
        cli(
            "quarantine", "list", "--site-dir", str(ingested["site"]), "--json", "--reason", "truncated"
        ).stdout
    )
    assert len(only) == 2
    table = cli("quarantine", "list", "--site-dir", str(ingested["site"])).stdout
    assert "absurd_dimensions" in table and "60000x60000" in table


def test_database_rows(ingested: dict) -> None:
    db = sqlite3.connect(ingested["site"] / "site.db")
    n_png = len(list((ingested["site"] / "images").rglob("*.png")))
    assert db.execute("select count(*) from images").fetchone()[0] == EXPECTED_ACCEPTED == n_png
    for name, lat, date, maker, model in db.execute(
        "select file_name, laterality, acquisition_date, manufacturer, model_name from images"
    ):
        img = np.asarray(Image.open(ingested["site"] / name))
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8  # canonical size from site.toml
        assert (
            Path(name).stem
            == __import__("hashlib").sha256(repr(img.shape).encode() + img.tobytes()).hexdigest()
        )
        assert lat in ("R", "L") and date == "20240311" and maker == "Topcon" and model == "TRC-NW400"
    # Report text exactly as read: CRLF and doubled quotes inside the quoted field.
    texts = {t for (t,) in db.execute("select text from reports")}
    assert OD_TEXT in texts and report_text(5) in texts
    # Per-eye linking: study 0's right eye gets the OD report, its left eye the study-wide report.
    rows = db.execute(
        "select i.laterality, r.text, ir.eye, ir.label_vector from images i "
        "join image_reports ir on ir.image_id=i.id join reports r on r.id=ir.report_id "
        "where r.accession_key = (select accession_key from reports where text=?)",
        (OD_TEXT,),
    ).fetchall()
    by_lat = {lat: (text, eye) for lat, text, eye, _ in rows}
    assert by_lat["R"] == (OD_TEXT, "OD") and by_lat["L"] == (report_text(0), "OS")
    # Stored label states are the extractor's, for the image's eye.
    from vilref_fed.labels import LabelPolicy, get_extractor
    from vilref_fed.ontology import load_ontology

    ids = load_ontology().label_ids
    for text, eye, pos, vec in db.execute(
        "select r.text, ir.eye, ir.positive, ir.label_vector "
        "from image_reports ir join reports r on r.id=ir.report_id"
    ):
        ref = get_extractor().extract(text, eye)
        assert json.loads(pos) == list(ref.positive)
        assert json.loads(vec) == LabelPolicy().vector(ref, ids)


def test_second_run_adds_nothing(ingested: dict) -> None:
    site = ingested["site"]
    db = sqlite3.connect(site / "site.db")
    tables = (
        "images",
        "source_files",
        "quarantine",
        "duplicates",
        "reports",
        "report_issues",
        "image_reports",
    )
    before = {t: db.execute(f"select count(*) from {t}").fetchone()[0] for t in tables}
    pngs = sorted(p.name for p in (site / "images").rglob("*"))
    again = cli(
        "ingest",
        "--site-dir",
        str(site),
        "--dicom",
        str(ingested["dicom"]),
        "--reports",
        str(ingested["csv"]),
    )
    assert table_row(again.stdout, "accepted") == ["0", str(EXPECTED_ACCEPTED)]
    assert table_row(again.stdout, "files already ingested")[0] == str(len(ingested["files"]))
    assert table_row(again.stdout, "duplicates") == ["0", "2"]
    after = {t: db.execute(f"select count(*) from {t}").fetchone()[0] for t in tables}
    assert after == before
    assert sorted(p.name for p in (site / "images").rglob("*")) == pngs


def test_no_identifiers_anywhere_in_the_site_and_no_report_text_in_logs(ingested: dict) -> None:
    """Grep the bytes of every file in the site directory (database, WAL, images, logs, config)."""
    import pydicom

    site = ingested["site"]
    needles: set[bytes] = set()
    for path in ingested["files"]:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            continue
        for kw in ("PatientID", "PatientName", "AccessionNumber", "StudyInstanceUID", "SOPInstanceUID"):
            v = str(ds.get(kw, "") or "").strip()
            if len(v) >= 6:
                needles.add(v.encode())
                needles.add(v.encode("utf-16-le"))
    for v in ("Zyxwv", "PID-QX", "ACCQX"):
        needles.add(v.encode())
    assert len(needles) > 40
    files = [p for p in site.rglob("*") if p.is_file()]
    assert any(p.name == "ingest.log" for p in files) and any(p.suffix == ".png" for p in files)
    for p in files:
        data = p.read_bytes()
        for n in needles:
            assert n not in data, (p.name, n[:20])
    sentences = [report_text(i).encode() for i in range(N_GOOD)] + [OD_TEXT.encode(), ORPHAN_TEXT.encode()]
    for p in (site / "logs").rglob("*"):
        data = p.read_bytes()
        assert data.strip(), p
        for s in sentences:
            assert s not in data and s[:30] not in data, p
    # Nor on the terminal.
    out = ingested["first"].stdout + ingested["first"].stderr
    for s in sentences:
        assert s.decode()[:30] not in out
    for n in ("Zyxwv", "PID-QX", "ACCQX"):
        assert n not in out


def test_changed_file_is_reread_without_duplicates(ingested: dict, tmp_path: Path) -> None:
    site = tmp_path / "site2"
    dcm = tmp_path / "dcm"
    p = write_dicom(dcm / "a.dcm", "truncated", identity(70), SIZE, 70)
    cli("init", "--site-dir", str(site), "--name", "B")
    cli("ingest", "--site-dir", str(site), "--dicom", str(dcm))
    write_dicom(p, "rle", identity(70), SIZE, 70)  # the export was completed: same path, new content
    cli("ingest", "--site-dir", str(site), "--dicom", str(dcm))
    st = json.loads(cli("status", "--site-dir", str(site), "--json").stdout)
    assert st["accepted"] == 1 and st["quarantined"] == {} and st["duplicates"] == 0
    import os

    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))  # touched, same content
    cli("ingest", "--site-dir", str(site), "--dicom", str(dcm))
    st = json.loads(cli("status", "--site-dir", str(site), "--json").stdout)
    assert st["accepted"] == 1 and st["duplicates"] == 0


def test_bad_invocations_are_one_line_errors(tmp_path: Path) -> None:
    site = tmp_path / "s"
    r = cli("ingest", "--site-dir", str(site), "--dicom", str(tmp_path), code=2)
    assert "not a site" in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    cli("init", "--site-dir", str(site), "--name", "S")
    r = cli("init", "--site-dir", str(site), "--name", "S", code=2)
    assert "already a site" in r.stderr
    r = cli("ingest", "--site-dir", str(site), code=2)
    assert "nothing to ingest" in r.stderr
    r = cli("ingest", "--site-dir", str(site), "--dicom", str(tmp_path / "missing"), code=2)
    assert "does not exist" in r.stderr
    r = cli("init", "--site-dir", str(tmp_path / "t"), "--name", "T", "--language", "fr", code=2)
    assert "language" in r.stderr
    r = cli("quarantine", "list", "--site-dir", str(site), "--reason", "nope", code=2)
    assert "unknown reason" in r.stderr


def test_odd_names_dicomdir_nested_site_and_two_workers(tmp_path: Path) -> None:
    """Any file name (non-UTF-8 bytes, spaces, no extension, very long), a DICOMDIR index, and the site
    directory nested inside the export; two decoding workers give exactly the one-process result."""
    import os

    from pydicom.data import get_testdata_file

    from vilref_fed.data.ingest import IngestOptions, ingest, quarantine_list
    from vilref_fed.data.site import init_site

    export = tmp_path / "export"
    odd = [
        os.fsdecode(b"caf\xe9 latin-1 name.dcm"),  # not valid UTF-8
        "no extension",
        "x" * 200,
        " leading space and trailing space ",
        "Ünïcödé 眼底 照片.DCM",
    ]
    for i, name in enumerate(odd):
        write_dicom(export / "odd" / name, "jpeg_ybr422", identity(30 + i, "L"), 64, 30 + i)
    (export / "reports in the export.csv").write_text("accession,report\nACCQX000030,Normal fundus.\n")
    dicomdir = get_testdata_file("DICOMDIR")
    if dicomdir:
        shutil.copy(dicomdir, export / "DICOMDIR")
    results = {}
    for workers in (1, 2):
        site_dir = export / f"nested site {workers}"  # inside the export: must not ingest itself
        with init_site(site_dir, f"W{workers}") as site:
            csv_in_export = export / "reports in the export.csv"  # named as --reports: not a DICOM
            r = ingest(site, IngestOptions(dicom=[export], reports=[csv_in_export], workers=workers))
            rows = {(q["reason"], Path(q["path"]).name) for q in quarantine_list(site)}
        db = sqlite3.connect(site_dir / "site.db")
        keys = sorted(k for (k,) in db.execute("select image_key from images"))
        paths = sorted(p for (p,) in db.execute("select path from source_files where outcome='accepted'"))
        results[workers] = (r.status["accepted"], r.status["quarantined"], keys)
        assert r.status["accepted"] == len(odd)
        assert all("nested site" not in p for p in paths)
        assert any("\ufffd" in p for p in paths)  # undecodable byte shown, not lost
        assert r.status["reports_linked"] == 1
        if dicomdir:
            assert ("wrong_modality", "DICOMDIR") in rows
            assert r.status["quarantined"] == {"wrong_modality": 1}
        else:
            assert r.status["quarantined"] == {}
    assert results[1] == results[2]


PYDICOM_COLOUR_FILES = [
    # pydicom's test files (secondary captures, modality OT) ...
    "SC_rgb.dcm", "SC_rgb_2frame.dcm", "SC_rgb_rle_16bit.dcm", "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_gdcm_KY.dcm", "SC_ybr_full_422_uncompressed.dcm",
    "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_jls_lossy_line.dcm",
    # ... and pydicom-data's colour ultrasound
    "US1_UNCR.dcm", "US1_J2KR.dcm", "color-px.dcm", "color3d_jpeg_baseline.dcm",
]  # fmt: skip


def test_pydicom_colour_files_table_rows(tmp_path: Path) -> None:
    """Third-party colour DICOMs through the CLI: ultrasound stays out; secondary captures come in once
    the site lists their modality, each with the outcome its encoding and the installed decoders allow."""
    import warnings

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import get_decoder

    dcm = tmp_path / "pydicom files"
    dcm.mkdir()
    frames, reasons = 0, {}
    for name in PYDICOM_COLOUR_FILES:
        src = get_testdata_file(name)
        if src is None:
            continue
        shutil.copy(src, dcm / name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(src, stop_before_pixels=True)
        if ds.get("Modality") == "US":
            reasons[name] = "wrong_modality"
        elif ds.get("Modality") != "OT":
            reasons[name] = "wrong_modality"  # no modality: not a fundus photograph even with OT listed
        elif not get_decoder(ds.file_meta.TransferSyntaxUID).is_available:
            reasons[name] = "decode_failure"
        else:
            frames += int(ds.get("NumberOfFrames", 1) or 1)
    n_files = len(list(dcm.iterdir()))
    assert n_files >= 10
    site = tmp_path / "site"
    cli("init", "--site-dir", str(site), "--name", "P")
    out = cli("ingest", "--site-dir", str(site), "--dicom", str(dcm)).stdout
    assert table_row(out, "accepted") == ["0", "0"]  # modality OT is not a fundus photo by default
    assert table_row(out, "quarantined: wrong_modality") == [str(n_files)] * 2

    toml = site / "site.toml"
    toml.write_text(
        toml.read_text().replace('fundus_modalities = ["OP"]', 'fundus_modalities = ["OP", "OT"]')
    )
    shutil.copytree(dcm, tmp_path / "again")  # the originals are recorded as quarantined already
    out = cli("ingest", "--site-dir", str(site), "--dicom", str(tmp_path / "again")).stdout
    accepted = int(table_row(out, "accepted")[0])
    duplicates = int(table_row(out, "duplicates")[0])
    # pydicom's SC_rgb files are one picture in several encodings (some share a SOP Instance UID):
    # every decodable frame is a new image or a counted duplicate.
    assert accepted + duplicates == frames > 5 and accepted >= 2
    for reason in set(reasons.values()):
        n = sum(1 for r in reasons.values() if r == reason)
        assert table_row(out, f"quarantined: {reason}")[0] == str(n), reason
    listed = json.loads(cli("quarantine", "list", "--site-dir", str(site), "--json").stdout)
    got = {Path(x["path"]).name: x["reason"] for x in listed if "/again/" in x["path"]}
    assert got == reasons
    for png in (site / "images").rglob("*.png"):
        assert np.asarray(Image.open(png)).shape == (256, 256, 3)


def test_several_paths_after_one_dicom_option(tmp_path: Path) -> None:
    a = write_dicom(tmp_path / "a" / "1.dcm", "rle", identity(80, "L"), 64, 80)
    b = write_dicom(tmp_path / "b" / "2.dcm", "rle", identity(81, "R"), 64, 81)
    site = tmp_path / "site"
    cli("init", "--site-dir", str(site), "--name", "Two folders")
    out = cli("ingest", "--site-dir", str(site), "--dicom", str(a.parent), str(b)).stdout
    assert table_row(out, "accepted") == ["2", "2"]
