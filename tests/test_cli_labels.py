"""`vilref-client labels extract` / `labels stats` (DESIGN §3.3): JSONL shape, eyes, bad input -> one line
and exit code 2, no traceback, no report text in any output, no half-written output file."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.cli import app
from vilref_fed.offline import child_env

RUNNER = CliRunner()
SECRET = "ZHANG-WEI-SECRET-4471"


def run(*args: str):
    result = RUNNER.invoke(app, ["labels", *args], env={"COLUMNS": "100"})
    assert "Traceback" not in result.output
    if result.exit_code not in (0,):
        assert isinstance(result.exception, SystemExit), result.exception
    return result


def write_csv(path: Path, rows: list[dict], header: list[str] | None = None) -> Path:
    header = header or list(rows[0])
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert SECRET not in result.output


def test_extract_writes_one_object_per_row_in_order(tmp_path):
    src = write_csv(
        tmp_path / "reports.csv",
        [
            {"report_id": "A1", "report": "No haemorrhages, exudates or macular oedema."},
            {"report_id": "A2", "report": f"{SECRET}: glaucoma suspect, C/D 0.8 OD."},
            {"report_id": "A3", "report": ""},
            {"report_id": "A4", "report": "右眼黄斑前膜，左眼正常。"},
        ],
    )
    out = tmp_path / "labels.jsonl"
    result = run("extract", str(src), "-o", str(out))
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert [r["report_id"] for r in rows] == ["A1", "A2", "A3", "A4"]
    assert all(list(r) == ["report_id", "positive", "uncertain", "negated"] for r in rows)
    assert rows[0] == {
        "report_id": "A1",
        "positive": [],
        "uncertain": [],
        "negated": ["diabetic_retinopathy", "macular_edema"],
    }
    assert rows[1]["positive"] == ["glaucoma"]
    assert rows[2] == {"report_id": "A3", "positive": [], "uncertain": [], "negated": []}
    assert rows[3]["positive"] == ["epiretinal_membrane"]
    assert "wrote 4 rows" in result.stdout
    assert SECRET not in result.output


def test_eye_column_selects_the_eye(tmp_path):
    text = "Right eye: moderate NPDR. Left eye: drusen."
    src = write_csv(
        tmp_path / "r.csv",
        [
            {"report_id": "1", "report": text, "eye": "OD"},
            {"report_id": "2", "report": text, "eye": "L"},
            {"report_id": "3", "report": text, "eye": ""},
            {"report_id": "4", "report": text, "eye": "??"},
        ],
    )
    out = tmp_path / "o.jsonl"
    result = run("extract", str(src), "-o", str(out))
    assert result.exit_code == 0
    rows = read_jsonl(out)
    assert rows[0]["positive"] == ["diabetic_retinopathy"]
    assert rows[1]["positive"] == ["age_related_macular_degeneration"]
    assert rows[2]["positive"] == ["diabetic_retinopathy", "age_related_macular_degeneration"]
    assert rows[3]["positive"] == rows[2]["positive"]
    assert "1 rows had an eye value" in result.stderr

    custom = write_csv(tmp_path / "c.csv", [{"report_id": "1", "report": text, "laterality": "OS"}])
    assert run("extract", str(custom), "-o", str(out), "--eye-column", "laterality").exit_code == 0
    assert read_jsonl(out)[0]["positive"] == ["age_related_macular_degeneration"]
    assert_one_line_error(run("extract", str(custom), "-o", str(out), "--eye-column", "side"), "side")


def test_missing_column_is_a_one_line_error(tmp_path):
    src = write_csv(tmp_path / "r.csv", [{"id": "1", "text": f"{SECRET} glaucoma"}])
    assert_one_line_error(
        run("extract", str(src), "-o", str(tmp_path / "o.jsonl")), "missing column", "report"
    )
    assert not (tmp_path / "o.jsonl").exists()


def test_undecodable_bytes_are_a_one_line_error_and_keep_the_old_output(tmp_path):
    src = tmp_path / "latin1.csv"
    src.write_bytes(
        b"report_id,report\n1,normal fundus\n2,drusen\n3,caf\xe9 " + SECRET.encode() + b" glaucoma\n"
    )
    out = tmp_path / "o.jsonl"
    out.write_text("previous results\n", encoding="utf-8")
    result = run("extract", str(src), "-o", str(out))
    assert_one_line_error(result, "line 4", "not UTF-8", "re-export")
    assert out.read_text(encoding="utf-8") == "previous results\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_unreadable_files_are_one_line_errors(tmp_path):
    out = str(tmp_path / "o.jsonl")
    assert_one_line_error(run("extract", str(tmp_path / "nope.csv"), "-o", out), "no such file")
    assert_one_line_error(run("extract", str(tmp_path), "-o", out), "is a directory")
    (tmp_path / "empty.csv").write_bytes(b"")
    assert_one_line_error(run("extract", str(tmp_path / "empty.csv"), "-o", out), "is empty")
    src = write_csv(tmp_path / "ok.csv", [{"report_id": "1", "report": "drusen"}])
    assert_one_line_error(run("extract", str(src), "-o", str(tmp_path / "no" / "o.jsonl")), "does not exist")
    if os.geteuid() != 0:  # root reads everything
        locked = write_csv(tmp_path / "locked.csv", [{"report_id": "1", "report": "drusen"}])
        locked.chmod(0)
        assert_one_line_error(run("extract", str(locked), "-o", out), "permission denied")


def test_malformed_rows_are_one_line_errors(tmp_path):
    src = tmp_path / "r.csv"
    src.write_text(f"report_id,report\n1,drusen\n2,{SECRET} glaucoma, no DR\n", encoding="utf-8")
    assert_one_line_error(run("extract", str(src), "-o", str(tmp_path / "o.jsonl")), "line 3", "3 fields")
    src.write_text(f'report_id,report\n1,"{SECRET} unterminated\n', encoding="utf-8")
    assert_one_line_error(run("extract", str(src), "-o", str(tmp_path / "o.jsonl")), "not valid CSV")


def test_long_report_other_scripts_and_bom(tmp_path):
    long_report = ("Mild NPDR with scattered microaneurysms; no macular oedema. " * 400)[:20000]
    src = tmp_path / "r.csv"
    rows = [
        {"report_id": "long", "report": long_report},
        {"report_id": "ru", "report": "Нормальное глазное дно без патологии."},
        {"report_id": "ar", "report": "قاع العين طبيعي"},
    ]
    write_csv(src, rows)
    src.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())  # Excel's UTF-8 BOM
    out = tmp_path / "o.jsonl"
    assert run("extract", str(src), "-o", str(out)).exit_code == 0
    got = {r["report_id"]: r for r in read_jsonl(out)}
    assert got["long"]["positive"] == ["diabetic_retinopathy"] and got["long"]["negated"] == ["macular_edema"]
    assert got["ru"] == {"report_id": "ru", "positive": [], "uncertain": [], "negated": []}
    assert got["ar"]["positive"] == [] and got["ar"]["negated"] == []


def test_large_file_with_progress_bar(tmp_path):
    rows = [
        {"report_id": str(i), "report": f"Report {i}: moderate NPDR, C/D 0.{i % 10}."} for i in range(12000)
    ]
    src = write_csv(tmp_path / "big.csv", rows)
    assert src.stat().st_size > 256 * 1024
    out = tmp_path / "o.jsonl"
    result = run("extract", str(src), "-o", str(out), "--progress")
    assert result.exit_code == 0
    got = read_jsonl(out)
    assert len(got) == 12000
    assert sum("glaucoma" in r["positive"] for r in got) == 3600  # C/D 0.7, 0.8, 0.9
    assert sum("glaucoma" in r["uncertain"] for r in got) == 1200  # C/D 0.6


def test_site_extension_option(tmp_path):
    ext = tmp_path / "syn.toml"
    ext.write_text('[synonyms.diabetic_retinopathy]\nen = ["sugar retinopathy"]\n', encoding="utf-8")
    src = write_csv(tmp_path / "r.csv", [{"report_id": "1", "report": "Sugar retinopathy."}])
    out = tmp_path / "o.jsonl"
    assert run("extract", str(src), "-o", str(out), "--extension", str(ext)).exit_code == 0
    assert read_jsonl(out)[0]["positive"] == ["diabetic_retinopathy"]
    ext.write_text('[synonyms.cataract]\nen = ["lens clouding"]\n', encoding="utf-8")
    assert_one_line_error(
        run("extract", str(src), "-o", str(out), "--extension", str(ext)),
        "'cataract' is not in the consortium",
    )
    ext.write_text('[[labels]]\nid = "cataract"\n', encoding="utf-8")  # brackets survive rich markup
    assert_one_line_error(
        run("extract", str(src), "-o", str(out), "--extension", str(ext)), "([synonyms.<label_id>] tables)"
    )


def test_stats_counts_per_label_and_state(tmp_path):
    out = tmp_path / "o.jsonl"
    lines = [
        {"report_id": "1", "positive": ["glaucoma"], "uncertain": [], "negated": ["macular_edema"]},
        {"report_id": "2", "positive": [], "uncertain": ["glaucoma"], "negated": []},
        {"report_id": "3", "positive": [], "uncertain": [], "negated": []},
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    result = run("stats", str(out), "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["reports"] == 3 and data["unlabelled"] == 1
    assert data["labels"]["glaucoma"] == {"positive": 1, "uncertain": 1}
    assert data["labels"]["macular_edema"] == {"negated": 1}
    table = run("stats", str(out))
    assert table.exit_code == 0
    row = next(line for line in table.stdout.splitlines() if "glaucoma" in line)
    assert row.split()[1:4] == ["1", "1", "0"] or [c for c in row.split() if c.isdigit()] == ["1", "1", "0"]
    assert "3 reports, 1 unlabelled" in table.stdout


def test_stats_bad_input(tmp_path):
    assert_one_line_error(run("stats", str(tmp_path / "missing.jsonl")), "no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"report_id": "1", "positive": [], "uncertain": [], "negated": []}\nnot json\n')
    assert_one_line_error(run("stats", str(bad)), "line 2", "not JSON")
    bad.write_text('{"report_id": "1"}\n')
    assert_one_line_error(run("stats", str(bad)), "line 1", "positive/uncertain/negated")


@pytest.mark.parametrize("payload", [b"report_id,report\n1,\xff\xfe glaucoma\n", b"\x00\x01\x02garbage\xff"])
def test_console_script_with_binary_input_exits_2_without_traceback(tmp_path, payload):
    """The real `vilref-client` entry point in a child process, as hospital IT would run it."""
    src = tmp_path / "r.csv"
    src.write_bytes(payload)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from client.cli import main; main()",
            "labels",
            "extract",
            str(src),
            "-o",
            str(tmp_path / "o.jsonl"),
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1
    assert "UTF-8" in proc.stderr or "missing column" in proc.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_write_failure_is_a_one_line_error(tmp_path, monkeypatch):
    """A full disk while writing: one line, exit 2, and no temporary file left behind."""
    from vilref_fed.labels import get_extractor
    from vilref_fed.labels.batch import ReportsFileError, extract_file

    src = write_csv(tmp_path / "r.csv", [{"report_id": str(i), "report": "drusen"} for i in range(50000)])
    out = tmp_path / "o.jsonl"
    real_fdopen = os.fdopen

    def full_disk(fd, *args, **kwargs):  # the real /dev/full device behind the temporary file's name
        os.close(fd)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", full_disk)
    with pytest.raises(ReportsFileError, match="failed"):
        extract_file(src, out, get_extractor())
    monkeypatch.undo()
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
