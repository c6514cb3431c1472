"""Ingestion killed mid-way (SIGKILL, and Ctrl-C) and run again ends in exactly the right counts,
with every database row pointing at a complete PNG and no PNG left without a row."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from dicom_factory import identity, write_dicom, write_jpeg_export
from PIL import Image

from vilref_fed.data.ingest import IngestOptions, ingest
from vilref_fed.data.preprocess import content_hash
from vilref_fed.data.site import init_site, open_site
from vilref_fed.offline import child_env

REPO = Path(__file__).resolve().parents[1]
N = 48  # good single-frame JPEG OP files


def _export(root: Path) -> Path:
    dcm = root / "export"
    write_jpeg_export(dcm, N, size=64)
    write_dicom(dcm / "zz broken" / "cut.dcm", "truncated", identity(900), 64, 900)
    write_dicom(dcm / "zz broken" / "ct.dcm", "ct", identity(901), 64, 901)
    shutil.copy(dcm / "study 000" / "IM 00003", dcm / "zz broken" / "copy of IM 00003")
    return dcm


EXPECTED = {"accepted": N, "quarantined": {"truncated": 1, "wrong_modality": 1}, "duplicates": 1}


def _committed(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("select count(*) from source_files").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _assert_consistent(site_dir: Path) -> None:
    """Every row's PNG exists and decodes to the canonical size; no image is recorded twice."""
    con = sqlite3.connect(site_dir / "site.db")
    rows = con.execute("select image_key, file_name from images").fetchall()
    assert len({k for k, _ in rows}) == len(rows)
    for key, name in rows:
        img = np.asarray(Image.open(site_dir / name))
        assert img.shape == (256, 256, 3), name
        assert Path(name).stem == key and content_hash(img) == key  # complete, named by its content
    n_sop = con.execute("select count(distinct sop_key || ':' || frame_index) from images").fetchone()[0]
    assert n_sop == len(rows)
    # A file is either fully recorded (all its rows) or not at all.
    for sid, outcome in con.execute("select id, outcome from source_files"):
        n_img = con.execute("select count(*) from images where source_file_id=?", (sid,)).fetchone()[0]
        n_q = con.execute("select count(*) from quarantine where source_file_id=?", (sid,)).fetchone()[0]
        n_d = con.execute("select count(*) from duplicates where source_file_id=?", (sid,)).fetchone()[0]
        assert (outcome, n_img, n_q, n_d) in (
            ("accepted", 1, 0, 0),
            ("quarantined", 0, 1, 0),
            ("duplicate", 0, 0, 1),
        )
    con.close()


def _status(site_dir: Path) -> dict:
    from vilref_fed.data.ingest import site_status

    with open_site(site_dir) as site:
        st = site_status(site)
    return {k: st[k] for k in EXPECTED}


def test_sigkill_mid_way_then_rerun_gives_exact_counts(tmp_path: Path) -> None:
    dcm = _export(tmp_path)
    site_dir = tmp_path / "site"
    init_site(site_dir, "Crash Test").close()
    cmd = [
        sys.executable, "-m", "client.cli", "ingest", "--site-dir", str(site_dir), "--dicom", str(dcm),
        "--commit-every", "3",
    ]  # fmt: skip
    db = site_dir / "site.db"
    killed_at = []
    for threshold in (4, 25):
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 120
        while proc.poll() is None and _committed(db) < threshold and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, f"ingestion finished before it could be killed: {proc.stderr.read()!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        killed_at.append(_committed(db))
        _assert_consistent(site_dir)
    print("killed after committed files:", killed_at)
    assert 0 < killed_at[0] < N + 3 and killed_at[0] <= killed_at[1] < N + 3, killed_at

    done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    _assert_consistent(site_dir)
    assert _status(site_dir) == EXPECTED
    pngs = list((site_dir / "images").rglob("*"))
    assert len([p for p in pngs if p.suffix == ".png"]) == N  # orphans of the killed runs removed
    assert not [p for p in pngs if p.name.startswith(".tmp-")]

    # The same export ingested in one go gives the same images.
    ref_dir = tmp_path / "reference"
    with init_site(ref_dir, "Reference") as ref:
        ingest(ref, IngestOptions(dicom=[dcm]))
    keys = lambda d: sorted(sqlite3.connect(d / "site.db").execute("select image_key from images").fetchall())  # noqa: E731
    assert keys(site_dir) == keys(ref_dir)
    assert _status(ref_dir) == EXPECTED


class _CtrlCAfter:
    """A progress sink that raises KeyboardInterrupt after `n` files, as Ctrl-C would."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = 0

    def phase(self, name: str, total: int | None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        self.seen += n
        if self.seen >= self.n:
            raise KeyboardInterrupt


def test_ctrl_c_then_rerun_finishes(tmp_path: Path) -> None:
    dcm = _export(tmp_path)
    site_dir = tmp_path / "site"
    with init_site(site_dir, "Interrupted") as site:
        try:
            ingest(site, IngestOptions(dicom=[dcm], commit_every=5), progress=_CtrlCAfter(17))
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("the interrupt did not propagate")
        _assert_consistent(site_dir)
        con = sqlite3.connect(site_dir / "site.db")
        assert con.execute("select status from ingest_runs").fetchall() == [("interrupted",)]
        assert 0 < con.execute("select count(*) from source_files").fetchone()[0] < N
        result = ingest(site, IngestOptions(dicom=[dcm]))
    assert result.run.files_skipped > 0
    _assert_consistent(site_dir)
    assert _status(site_dir) == EXPECTED
