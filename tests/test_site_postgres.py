"""The site database on a real PostgreSQL server (storage.database_url in site.toml).

The server is, in order: the one named by VILREF_TEST_POSTGRES_URL (a SQLAlchemy URL to an empty
database), or a throw-away cluster started here from the local PostgreSQL binaries (initdb/pg_ctl,
Unix socket only, no TCP port). Without psycopg, binaries or a reachable server the test is skipped
with the reason.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_factory import identity, write_dicom

from vilref_fed.data.ingest import IngestOptions, ingest, quarantine_list
from vilref_fed.data.site import init_site, open_site
from vilref_fed.data.site_dataset import SiteDataset


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install '.[postgres]')")
    url = os.environ.get("VILREF_TEST_POSTGRES_URL")
    if url:
        from sqlalchemy import create_engine, text

        try:
            engine = create_engine(url)
            with engine.connect() as con:
                con.execute(text("SELECT 1"))
            engine.dispose()
        except Exception as exc:
            pytest.skip(f"VILREF_TEST_POSTGRES_URL is not reachable: {type(exc).__name__}")
        yield url
        return
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server: set VILREF_TEST_POSTGRES_URL or install the server binaries")
    root = Path(tempfile.mkdtemp(prefix="vilref-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        runuser = shutil.which("runuser")
        if not runuser:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("running as root without runuser: cannot start a PostgreSQL cluster")
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        prefix = [runuser, "-u", "postgres", "--"]
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    try:
        subprocess.run(
            [*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "vilref", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, timeout=120, env=env,
        )  # fmt: skip
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "start",
             "-o", f"-k {sock} -c listen_addresses='' -F"],
            check=True, capture_output=True, timeout=120, env=env,
        )  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a local PostgreSQL cluster: {exc}")
    try:
        import psycopg

        with psycopg.connect(host=str(sock), user="vilref", dbname="postgres", autocommit=True) as con:
            con.execute("CREATE DATABASE vilref_site")
        yield f"postgresql+psycopg://vilref@/vilref_site?host={sock}"
    finally:
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60
        )
        shutil.rmtree(root, ignore_errors=True)


def test_ingestion_on_postgresql_matches_sqlite(tmp_path: Path, postgres_url: str) -> None:
    dcm = tmp_path / "dcm"
    rows = ["accession,eye,report"]
    for i, kind in enumerate(["jpeg_ybr422", "rle", "multiframe", "explicit_rgb"]):
        write_dicom(dcm / f"患者 {i}.dcm", kind, identity(i, "R" if i % 2 else "L"), 64, i)
        rows.append(
            f'ACCQX{i:06d},,"Report {i}: moderate non-proliferative diabetic retinopathy.\nSecond line."'
        )
    write_dicom(dcm / "cut.dcm", "truncated", identity(9), 64, 9)
    rows.append("ACCQX000009,OD,too,many")
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    opts = IngestOptions(dicom=[dcm], reports=[tmp_path / "r.csv"])

    with init_site(tmp_path / "pg", "PG Clinic", database_url=postgres_url) as site:
        assert site.engine.dialect.name == "postgresql"
        first = ingest(site, opts)
    with init_site(tmp_path / "lite", "SQLite Clinic") as site:
        reference = ingest(site, opts)
    keys = (
        "accepted",
        "quarantined",
        "duplicates",
        "reports_linked",
        "reports_orphan",
        "images_without_report",
    )
    assert {k: first.status[k] for k in keys} == {k: reference.status[k] for k in keys}
    assert first.status["accepted"] == 6 and first.status["quarantined"] == {"truncated": 1}
    assert first.status["report_issues"] == {"malformed_row": 1}

    with open_site(tmp_path / "pg") as site:  # reopen: schema already migrated, nothing added twice
        again = ingest(site, opts)
        assert again.run.accepted == 0 and again.run.files_skipped == 5
        assert {k: again.status[k] for k in keys} == {k: first.status[k] for k in keys}
        assert [q["reason"] for q in quarantine_list(site)] == ["truncated"]
        from sqlalchemy import select

        from vilref_fed.store.site_models import Report

        with site.session() as s:
            texts = sorted(s.scalars(select(Report.text)))
        assert texts[0] == "Report 0: moderate non-proliferative diabetic retinopathy.\nSecond line."
    ds = SiteDataset(tmp_path / "pg", split="all", image_size=32)
    assert len(ds) == 6 and ds[0]["image"].shape == (3, 32, 32)
