"""Report CSVs (strict reading, exact text, file+line for every skipped row, GB18030) and how reports link
to images (accession or study, per eye, order-independent, corrections relinked)."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest
from dicom_factory import identity, write_dicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from client.cli import app
from vilref_fed.data.ingest import IngestOptions, ingest, site_status
from vilref_fed.data.reports_csv import ReportsCsvError, read_reports_csv
from vilref_fed.data.site import init_site
from vilref_fed.labels import get_extractor

runner = CliRunner()


def write_csv(path: Path, header: list[str], rows: list[list[str]], encoding: str = "utf-8") -> Path:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


# ----------------------------------------------------------------------------- the CSV reader


def test_text_is_kept_exactly(tmp_path: Path) -> None:
    texts = [
        'OD: "dot-blot" haemorrhages,\r\nOS: normal.',
        "  leading and trailing spaces  ",
        "Line one\nline two\n\nline four",
        'Quote at end"',
    ]
    p = write_csv(
        tmp_path / "r.csv",
        ["report_id", "accession", "report"],
        [[f"R{i}", f"A{i}", t] for i, t in enumerate(texts)],
    )
    got = read_reports_csv(p)
    assert [r.text for r in got.rows] == texts
    assert not got.issues
    assert [r.line for r in got.rows] == [2, 4, 5, 9]  # physical start lines
    assert "haemorrhages" not in repr(got.rows[0]) and "A0" not in repr(got.rows[0])


def test_bad_rows_are_listed_and_never_cost_the_rows_after_them(tmp_path: Path) -> None:
    p = tmp_path / "r.csv"
    p.write_text(
        "accession,eye,report\n"
        "A1,OD,Drusen.\n"  # 2
        "A2,OS,one,two\n"  # 3 too many fields
        "A3,OS\n"  # 4 too few
        'A4,OD,"never closed\n'  # 5 unbalanced quote
        "A5,OD,Normal.\n"  # 6
        ",OD,No accession.\n"  # 7
        "A8,left-ish,Bad eye.\n"  # 8
        'A9,OU,""\n'  # 9 empty
        "A10,R,Normal.\n"  # 10
        "A11,,Nul \x00 inside.\n"  # 11
        "A12,左眼,正常眼底。\n",  # 12
        encoding="utf-8",
    )
    got = read_reports_csv(p)
    assert [(r.line, r.accession, r.eye) for r in got.rows] == [
        (2, "A1", "OD"), (6, "A5", "OD"), (10, "A10", "OD"), (12, "A12", "OS"),
    ]  # fmt: skip
    assert [(i.line, i.kind) for i in got.issues] == [
        (3, "malformed_row"), (4, "malformed_row"), (5, "malformed_row"), (7, "missing_key"),
        (8, "bad_eye"), (9, "empty_report"), (11, "nul_character"),
    ]  # fmt: skip
    for issue in got.issues:  # never echo cell values
        assert "A2" not in issue.message and "left-ish" not in issue.message


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(
        st.text(
            alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1
        ).filter(lambda t: t.strip()),
        min_size=1,
        max_size=12,
    ),
    bad=st.lists(st.integers(0, 11), max_size=4),
)
def test_property_csv_writer_round_trip_with_corrupt_rows(
    tmp_path: Path, texts: list[str], bad: list[int]
) -> None:
    """Rows written by csv.writer come back exactly, at their line; rows with an extra field are skipped
    and listed by line, and never take the next row with them."""
    import re

    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["accession", "report"])

    def next_line() -> int:  # physical line where the next record starts
        return len(re.findall(r"\r\n|\r|\n", buf.getvalue())) + 1

    expected, bad_lines = [], []
    for i, t in enumerate(texts):
        if i in bad:
            bad_lines.append(next_line())
            w.writerow([f"X{i}", "extra", "field"])
        expected.append((f"A{i}", t, next_line()))
        w.writerow([f"A{i}", t])
    p = tmp_path / "prop.csv"
    p.write_bytes(buf.getvalue().encode("utf-8"))
    got = read_reports_csv(p)
    assert [(r.accession, r.text, r.line) for r in got.rows] == expected
    assert [(i.kind, i.line) for i in got.issues] == [("malformed_row", n) for n in bad_lines]


def test_whole_file_problems(tmp_path: Path) -> None:
    p = write_csv(tmp_path / "r.csv", ["id", "text"], [["1", "x"]])
    with pytest.raises(ReportsCsvError, match="no accession column"):
        read_reports_csv(p)
    p2 = write_csv(tmp_path / "r2.csv", ["accession", "findings"], [["1", "x"]])
    with pytest.raises(ReportsCsvError, match="no report column"):
        read_reports_csv(p2)
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(ReportsCsvError, match="empty"):
        read_reports_csv(tmp_path / "empty.csv")
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffAccession Number,Report\nA1,Normal.\n".encode())
    assert [r.accession for r in read_reports_csv(bom).rows] == ["A1"]
    with pytest.raises(ReportsCsvError, match="unknown encoding"):
        read_reports_csv(bom, encoding="klingon")


ZH_REPORT = "双眼中度非增殖性糖尿病视网膜病变，黄斑区可见硬性渗出。\n建议三个月后复查。"


def test_gb18030_needs_the_encoding_option(tmp_path: Path) -> None:
    p = write_csv(
        tmp_path / "zh.csv", ["accession", "eye", "report"], [["A1", "", ZH_REPORT]], encoding="gb18030"
    )
    with pytest.raises(ReportsCsvError) as err:
        read_reports_csv(p)
    msg = str(err.value)
    assert "--encoding" in msg and "gb18030" in msg and "line 2" in msg and "\n" not in msg
    got = read_reports_csv(p, encoding="gb18030")
    assert got.rows[0].text == ZH_REPORT


# ----------------------------------------------------------------------------- through the CLI


def cli(*args: str, code: int = 0):
    r = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert r.exit_code == code, (r.stdout, r.stderr, r.exception)
    return r


def test_cli_gb18030_error_then_success(tmp_path: Path) -> None:
    site = tmp_path / "site"
    dcm = tmp_path / "dcm"
    write_dicom(dcm / "a.dcm", "jpeg_ybr422", identity(1, "L"), 64, 1)
    p = write_csv(
        tmp_path / "报告.csv", ["accession", "eye", "report"], [["ACCQX000001", "", ZH_REPORT]], "gb18030"
    )
    cli("init", "--site-dir", str(site), "--name", "北京眼科", "--language", "zh")
    r = cli("ingest", "--site-dir", str(site), "--dicom", str(dcm), "--reports", str(p), code=2)
    assert "--encoding" in r.stderr and "Traceback" not in r.stderr
    assert not (site / "images").exists() or not list((site / "images").rglob("*.png"))  # nothing written
    r = cli(
        "ingest", "--site-dir", str(site), "--dicom", str(dcm), "--reports", str(p), "--encoding", "gb18030"
    )
    st = json.loads(cli("status", "--site-dir", str(site), "--json").stdout)
    assert st["reports_linked"] == 1 and st["images_without_report"] == 0
    con = sqlite3.connect(site / "site.db")
    ((text, vec),) = con.execute(
        "select r.text, ir.positive from reports r join image_reports ir on ir.report_id=r.id"
    )
    assert text == ZH_REPORT
    assert json.loads(vec) == list(get_extractor().extract(ZH_REPORT, "OS").positive)
    assert "diabetic_retinopathy" in json.loads(vec)


# ----------------------------------------------------------------------------- linking


def _site_with_study(tmp_path: Path, link_by: str = "accession"):
    """Study 1: right + left eye + an image without laterality; study 2: one left eye."""
    dcm = tmp_path / "dcm"
    write_dicom(dcm / "r.dcm", "rle", identity(1, "R"), 64, 1)
    write_dicom(dcm / "l.dcm", "rle", identity(1, "L"), 64, 2)
    write_dicom(dcm / "u.dcm", "rle", identity(1, None), 64, 3)
    write_dicom(dcm / "s2.dcm", "rle", identity(2, "L"), 64, 4)
    site = init_site(tmp_path / "site", "Links")
    return site, dcm


def _links(site) -> dict[str, tuple[str | None, str | None]]:
    """Image laterality (or '-') -> (report text, extraction eye), for study 1 images."""
    con = sqlite3.connect(site.root / "site.db")
    acc = site.key("accession", "ACCQX000001")
    out = {}
    for lat, text, eye in con.execute(
        "select i.laterality, r.text, ir.eye from images i left join image_reports ir on ir.image_id=i.id "
        "left join reports r on r.id=ir.report_id where i.accession_key=?",
        (acc,),
    ):
        out[lat or "-"] = (text, eye)
    return out


PER_EYE = "OD: moderate non-proliferative diabetic retinopathy. OS: normal fundus."


def test_study_report_applies_to_every_image_with_per_eye_labels(tmp_path: Path) -> None:
    site, dcm = _site_with_study(tmp_path)
    csvp = write_csv(tmp_path / "r.csv", ["accession", "eye", "report"], [["ACCQX000001", "", PER_EYE]])
    ingest(site, IngestOptions(dicom=[dcm], reports=[csvp]))
    links = _links(site)
    assert links == {"R": (PER_EYE, "OD"), "L": (PER_EYE, "OS"), "-": (PER_EYE, None)}
    con = sqlite3.connect(site.root / "site.db")
    pos = dict(
        con.execute(
            "select i.laterality, ir.positive from images i join image_reports ir on ir.image_id=i.id "
            "where i.laterality is not null and i.accession_key=?",
            (site.key("accession", "ACCQX000001"),),
        ).fetchall()
    )
    ex = get_extractor()
    assert json.loads(pos["R"]) == list(ex.extract(PER_EYE, "OD").positive)
    assert json.loads(pos["L"]) == list(ex.extract(PER_EYE, "OS").positive)
    assert "diabetic_retinopathy" in json.loads(pos["R"]) and "diabetic_retinopathy" not in json.loads(
        pos["L"]
    )
    st = site_status(site)
    assert st["images_without_report"] == 1 and st["reports_orphan"] == 0  # study 2 has no report


def test_eye_specific_reports_and_order_independence(tmp_path: Path) -> None:
    site, dcm = _site_with_study(tmp_path)
    rows = [
        ["ACCQX000001", "OD", "Right: glaucoma suspect."],
        ["ACCQX000001", "OU", "Both eyes: tessellated fundus."],
        ["ACCQX000002", "OS", "Left: drusen."],
        ["ACCQX000003", "OD", "Study without images."],
    ]
    csvp = write_csv(tmp_path / "r.csv", ["accession", "eye", "report"], rows)
    ingest(site, IngestOptions(reports=[csvp]))  # reports first, images later: links appear then
    assert site_status(site)["reports_orphan"] == 4
    ingest(site, IngestOptions(dicom=[dcm]))
    links = _links(site)
    assert links["R"] == ("Right: glaucoma suspect.", "OD")
    assert links["L"] == ("Both eyes: tessellated fundus.", "OS")
    assert links["-"] == ("Both eyes: tessellated fundus.", None)
    st = site_status(site)
    assert st["reports_linked"] == 3 and st["reports_orphan"] == 1 and st["images_without_report"] == 0


def test_report_with_eye_never_links_to_an_image_of_unknown_eye(tmp_path: Path) -> None:
    site, dcm = _site_with_study(tmp_path)
    csvp = write_csv(
        tmp_path / "r.csv", ["accession", "eye", "report"], [["ACCQX000001", "OS", "Left: drusen."]]
    )
    ingest(site, IngestOptions(dicom=[dcm], reports=[csvp]))
    links = _links(site)
    assert links["L"] == ("Left: drusen.", "OS") and links["R"] == (None, None) and links["-"] == (None, None)


def test_link_by_study_uid(tmp_path: Path) -> None:
    site, dcm = _site_with_study(tmp_path)
    uid = identity(1).study_uid
    csvp = write_csv(tmp_path / "r.csv", ["study_uid", "report"], [[uid, "Normal fundus."]])
    r = ingest(site, IngestOptions(dicom=[dcm], reports=[csvp], link_by="study"))
    assert r.status["reports_linked"] == 1 and r.status["images_without_report"] == 1
    with pytest.raises(Exception, match="no accession column"):
        ingest(site, IngestOptions(reports=[csvp], link_by="accession"))


def test_corrected_report_is_relinked_with_new_labels(tmp_path: Path) -> None:
    site, dcm = _site_with_study(tmp_path)
    header = ["report_id", "accession", "eye", "report"]
    v1 = write_csv(tmp_path / "v1.csv", header, [["RID1", "ACCQX000002", "", "Normal fundus."]])
    ingest(site, IngestOptions(dicom=[dcm], reports=[v1]))
    v2 = write_csv(
        tmp_path / "v2.csv", header, [["RID1", "ACCQX000002", "", "Severe glaucomatous cupping; glaucoma."]]
    )
    r = ingest(site, IngestOptions(reports=[v2]))
    assert r.run.reports_updated == 1 and r.run.reports_new == 0
    con = sqlite3.connect(site.root / "site.db")
    assert con.execute("select count(*) from reports").fetchone()[0] == 1
    (pos,) = con.execute(
        "select ir.positive from image_reports ir join images i on i.id=ir.image_id where i.accession_key=?",
        (site.key("accession", "ACCQX000002"),),
    ).fetchone()
    assert "glaucoma" in json.loads(pos)
    again = ingest(site, IngestOptions(reports=[v2]))
    assert again.run.reports_unchanged == 1 and again.run.links_added == 0
