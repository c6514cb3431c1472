"""Site directory, configuration, secret, keyed hashes, schema migrations, the patient split and the
SiteDataset training view, plus ingestion of pydicom's own colour files."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import stat
import tomllib
from pathlib import Path

import pytest
import torch
from dicom_factory import identity, write_dicom
from sqlalchemy import inspect

from vilref_fed.data.ingest import IngestOptions, ingest
from vilref_fed.data.site import (
    SiteConfig,
    SiteError,
    init_site,
    keyed_hash,
    open_site,
    parse_site_toml,
    patient_split,
)
from vilref_fed.data.site_dataset import SiteDataset
from vilref_fed.store.site_models import Base


def test_init_writes_documented_defaults_and_a_private_secret(tmp_path: Path) -> None:
    with init_site(tmp_path / "s", "North Clinic") as site:
        root = site.root
    text = (root / "site.toml").read_text()
    data = tomllib.loads(text)
    assert data["site"] == {"name": "North Clinic", "language": "en"}
    assert data["images"]["image_size"] == 256 and data["ingest"]["link_by"] == "accession"
    assert text.count("\n# ") >= 12  # every setting explained
    assert parse_site_toml(root / "site.toml") == SiteConfig(name="North Clinic")
    mode = stat.S_IMODE((root / "secret.key").stat().st_mode)
    assert mode == 0o600 and len(bytes.fromhex((root / "secret.key").read_text().strip())) == 32
    for sub in ("images", "state", "logs"):
        assert (root / sub).is_dir()
    with open_site(root) as site:
        assert site.config.name == "North Clinic" and site.images_dir == root / "images"
        assert site.state_dir == root / "state"
    with pytest.raises(SiteError, match="already a site"):
        init_site(root, "Again")


def test_config_errors_name_the_setting(tmp_path: Path) -> None:
    init_site(tmp_path / "s", "S").close()
    toml = tmp_path / "s" / "site.toml"
    good = toml.read_text()
    for bad, match in (
        (good.replace("image_size = 256", "image_sise = 256"), "images.image_sise"),
        (good.replace("image_size = 256", 'image_size = "big"'), "images.image_size"),
        (good.replace('language = "en"', 'language = "fr"'), "language"),
        (good.replace('link_by = "accession"', 'link_by = "patient"'), "link_by"),
        (good + "\n[extra]\nx = 1\n", r"\[extra\]"),
        ("not toml = = =", "not valid TOML"),
    ):
        toml.write_text(bad)
        with pytest.raises(SiteError, match=match):
            open_site(tmp_path / "s")
    toml.write_text(good)
    open_site(tmp_path / "s").close()


def test_secret_mismatch_and_missing_secret_are_refused(tmp_path: Path) -> None:
    init_site(tmp_path / "s", "S").close()
    secret = tmp_path / "s" / "secret.key"
    original = secret.read_text()
    secret.write_text("ab" * 32)
    with pytest.raises(SiteError, match="does not match"):
        open_site(tmp_path / "s")
    secret.unlink()
    with pytest.raises(SiteError, match="missing"):
        open_site(tmp_path / "s")
    secret.write_text(original)
    open_site(tmp_path / "s").close()
    with pytest.raises(SiteError, match="not a site"):
        open_site(tmp_path / "nowhere")


def test_keyed_hash_is_hmac_sha256(tmp_path: Path) -> None:
    secret = b"k" * 32
    ref = hmac.new(secret, b"patient\x1fPID-1", hashlib.sha256).hexdigest()
    assert keyed_hash(secret, "patient", "  PID-1 ") == ref  # DICOM space padding ignored
    assert keyed_hash(secret, "accession", "PID-1") != ref  # domain separated
    assert keyed_hash(b"j" * 32, "patient", "PID-1") != ref
    assert keyed_hash(secret, "patient", "") is None and keyed_hash(secret, "patient", None) is None
    with init_site(tmp_path / "a", "A") as a, init_site(tmp_path / "b", "B") as b:
        assert a.key("patient", "PID-1") != b.key("patient", "PID-1")  # per-site secret


def test_migrated_schema_matches_the_models_and_is_idempotent(tmp_path: Path) -> None:
    with init_site(tmp_path / "s", "S") as site:
        insp = inspect(site.engine)
        for table in Base.metadata.sorted_tables:
            got = {c["name"]: (type(c["type"]).__name__, c["nullable"]) for c in insp.get_columns(table.name)}
            want = {c.name: c.nullable for c in table.columns}
            assert set(got) == set(want), table.name
            for name, nullable in want.items():
                assert got[name][1] == nullable or table.c[name].primary_key, (table.name, name)
            assert {u["name"] for u in insp.get_unique_constraints(table.name)} >= {
                c.name for c in table.constraints if c.__class__.__name__ == "UniqueConstraint" and c.name
            }
    for _ in range(2):
        open_site(tmp_path / "s").close()
    con = sqlite3.connect(tmp_path / "s" / "site.db")
    assert con.execute("select schema_name, version from schema_version").fetchall() == [("site", 1)]


def test_patient_split_is_stable_and_near_the_fraction() -> None:
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    a = [patient_split(k, 0.1) for k in keys]
    assert a == [patient_split(k, 0.1) for k in keys]
    assert 0.085 < a.count("val") / len(a) < 0.115
    assert all(patient_split(k, 0.0) == "train" for k in keys[:50])
    # Growing the validation fraction only moves patients from train to val.
    b = [patient_split(k, 0.2) for k in keys]
    assert all(y == "val" for x, y in zip(a, b, strict=True) if x == "val")


REPORTS = {
    0: "Moderate non-proliferative diabetic retinopathy.",
    1: "Possible glaucoma, review in clinic.",
    2: "Normal fundus.",
    3: "Drusen at the macula, early age-related macular degeneration.",
}


def _dataset_site(tmp_path: Path) -> Path:
    dcm = tmp_path / "dcm"
    rows = ["accession,report"]
    n = 0
    for patient in range(24):
        for eye in ("R", "L"):
            write_dicom(dcm / f"p{patient}{eye}.dcm", "rle", identity(patient, eye), 64, n)
            n += 1
        rows.append(f'ACCQX{patient:06d},"{REPORTS[patient % 4]}"')
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    with init_site(tmp_path / "site", "DS") as site:
        (site.root / "site.toml").write_text((site.root / "site.toml").read_text().replace("0.1", "0.25"))
    with open_site(tmp_path / "site") as site:
        ingest(site, IngestOptions(dicom=[dcm], reports=[tmp_path / "r.csv"]))
    return tmp_path / "site"


def test_site_dataset_items_split_and_policy(tmp_path: Path) -> None:
    from vilref_fed.labels import LabelPolicy
    from vilref_fed.ontology import load_ontology

    site_dir = _dataset_site(tmp_path)
    ids = load_ontology().label_ids
    full = SiteDataset(site_dir, split="all", image_size=32)
    train = SiteDataset(site_dir, split="train", image_size=32)
    val = SiteDataset(site_dir, split="val", image_size=32)
    assert len(full) == 48 and len(train) + len(val) == 48 and len(val) > 0 and len(train) > 0
    assert not set(train.groups()) & set(val.groups())  # no patient in both
    assert {r.image_id for r in train.records} == {
        r.image_id for r in SiteDataset(site_dir, "train", 32).records
    }
    item = train[0]
    assert set(item) == {"image", "text", "labels", "image_id"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["labels"].shape == (len(ids),) and item["labels"].dtype == torch.float32
    assert item["text"] in REPORTS.values()
    assert abs(float(item["image"].mean())) < 3.0  # normalised, not 0..255
    # Uncertain glaucoma counts as positive by default, not with the strict policy.
    g = ids.index("glaucoma")
    suspect = [i for i, r in enumerate(full.records) if r.text == REPORTS[1]]
    strict = SiteDataset(
        site_dir, split="all", image_size=32, policy=LabelPolicy(uncertain_as_positive=False)
    )
    assert all(full.labels[i, g] == 1 for i in suspect) and all(strict.labels[i, g] == 0 for i in suspect)
    dr = ids.index("diabetic_retinopathy")
    assert all(full.labels[i, dr] == 1 for i, r in enumerate(full.records) if r.text == REPORTS[0])
    loader = torch.utils.data.DataLoader(train, batch_size=8, num_workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 3, 32, 32) and len(batch["text"]) == 8
