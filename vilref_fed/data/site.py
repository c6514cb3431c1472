"""A hospital's site directory: configuration, secret, database, canonical images, training state.

Layout (DESIGN.md §3.4)::

    SITE/site.toml     configuration with documented defaults (written by `init_site`)
    SITE/secret.key    per-site secret (mode 0600) keying every identifier hash; never leaves the site
    SITE/site.db       SQLite database (unless site.toml names a PostgreSQL URL)
    SITE/images/       canonical PNGs, named by the SHA-256 of their pixels
    SITE/state/        training site state (momentum encoders, queues)
    SITE/logs/         logs: counts, reasons and hashes only

Identifiers (patient ID, study UID, accession number, SOP instance UID, source paths) are stored only as
HMAC-SHA256 keyed with the site secret: equal IDs still match across exports, but a stolen database
cannot be reversed by hashing a list of candidate IDs without the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from vilref_fed.data.dicom import (
    DEFAULT_FUNDUS_ANATOMY_CODES,
    DEFAULT_FUNDUS_BODY_PARTS,
    FundusRule,
    ReadLimits,
)

SITE_TOML = "site.toml"
SECRET_FILE = "secret.key"
SQLITE_FILE = "site.db"
LANGUAGES = ("en", "zh")
LINK_MODES = ("accession", "study")


class SiteError(Exception):
    """A site that cannot be created or opened; the message says what to do."""


@dataclass(frozen=True)
class SiteConfig:
    """site.toml, parsed and validated. Field defaults are the documented defaults."""

    name: str
    language: str = "en"
    database_url: str = ""
    secret_file: str = SECRET_FILE
    image_size: int = 256
    link_by: str = "accession"
    report_encoding: str = "utf-8"
    fundus_modalities: tuple[str, ...] = ("OP",)
    fundus_body_parts: tuple[str, ...] = DEFAULT_FUNDUS_BODY_PARTS
    fundus_anatomy_codes: tuple[str, ...] = DEFAULT_FUNDUS_ANATOMY_CODES
    max_image_side: int = 16384
    max_frames: int = 1000
    record_source_paths: bool = True
    workers: int = 1
    val_fraction: float = 0.1
    extra: dict[str, Any] = field(default_factory=dict)

    def read_limits(self) -> ReadLimits:
        return ReadLimits(max_side=self.max_image_side, max_frames=self.max_frames)

    def fundus_rule(self) -> FundusRule:
        return FundusRule(
            modalities=self.fundus_modalities,
            body_parts=self.fundus_body_parts,
            anatomy_codes=self.fundus_anatomy_codes,
        )


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(_toml_str(x) for x in items) + "]"


def render_site_toml(cfg: SiteConfig) -> str:
    """site.toml with every setting written out and explained, so IT can read and edit it."""
    return f"""# vilref-fed site configuration, written by `vilref-client init`.
# Everything in this directory stays on this machine; only model weights and scalar metrics are sent.

[site]
# Name shown to the consortium coordinator. Not a patient identifier.
name = {_toml_str(cfg.name)}
# Language of the diagnostic reports: "en" or "zh" (text tokenizer, zero-shot prompts).
language = {_toml_str(cfg.language)}

[storage]
# Empty: the SQLite database site.db in this directory. Otherwise a SQLAlchemy URL, for example
# "postgresql+psycopg://vilref@dbhost/site_a" (keep the password in ~/.pgpass, not here).
database_url = {_toml_str(cfg.database_url)}
# File holding the per-site secret that keys every identifier hash (HMAC-SHA256). Back it up with the
# database: without it new exports cannot be matched to images already ingested. Never share it.
secret_file = {_toml_str(cfg.secret_file)}

[images]
# Side in pixels of the canonical square images stored in images/ (training and screening resize from it).
image_size = {cfg.image_size}

[ingest]
# How reports are linked to images: "accession" (Accession Number) or "study" (Study Instance UID).
link_by = {_toml_str(cfg.link_by)}
# Text encoding of report CSV files; override per run with --encoding (Chinese exports: "gb18030").
report_encoding = {_toml_str(cfg.report_encoding)}
# Ophthalmic Photography files are always fundus photos. VL Photographic and Secondary Capture files are
# accepted when their Modality is listed here, their Body Part Examined is listed below, or their
# Anatomic Region Sequence holds one of the codes below (eye, retina, fundus).
fundus_modalities = {_toml_list(cfg.fundus_modalities)}
fundus_body_parts = {_toml_list(cfg.fundus_body_parts)}
fundus_anatomy_codes = {_toml_list(cfg.fundus_anatomy_codes)}
# Largest image a header may declare; bigger files are refused from the header, never allocated.
max_image_side = {cfg.max_image_side}
max_frames = {cfg.max_frames}
# true: the database keeps each source file's path so `status` and `quarantine list` can name it.
# false: paths are stored only as keyed hashes (choose this if export folders are named after patients).
record_source_paths = {"true" if cfg.record_source_paths else "false"}
# Decoding processes used by `ingest` (1 = decode in the ingesting process).
workers = {cfg.workers}

[split]
# Fraction of patients held out for validation; the split is per patient and stable across runs.
val_fraction = {cfg.val_fraction}
"""


_SCHEMA: dict[str, dict[str, tuple[str, type | tuple[type, ...]]]] = {
    "site": {"name": ("name", str), "language": ("language", str)},
    "storage": {"database_url": ("database_url", str), "secret_file": ("secret_file", str)},
    "images": {"image_size": ("image_size", int)},
    "ingest": {
        "link_by": ("link_by", str),
        "report_encoding": ("report_encoding", str),
        "fundus_modalities": ("fundus_modalities", list),
        "fundus_body_parts": ("fundus_body_parts", list),
        "fundus_anatomy_codes": ("fundus_anatomy_codes", list),
        "max_image_side": ("max_image_side", int),
        "max_frames": ("max_frames", int),
        "record_source_paths": ("record_source_paths", bool),
        "workers": ("workers", int),
    },
    "split": {"val_fraction": ("val_fraction", (float, int))},
}


def parse_site_toml(path: Path) -> SiteConfig:
    """Read and validate site.toml: a typo or wrong type is an error naming the key, not a default."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SiteError(
            f"{path} not found; create the site with `vilref-client init --site-dir DIR --name NAME`"
        ) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SiteError(f"{path} is not valid TOML ({exc}); fix the file or restore it from backup") from exc
    values: dict[str, Any] = {}
    for section, content in data.items():
        if section not in _SCHEMA or not isinstance(content, dict):
            raise SiteError(f"{path}: unknown section [{section}]; known: {', '.join(_SCHEMA)}")
        for key, value in content.items():
            if key not in _SCHEMA[section]:
                raise SiteError(
                    f"{path}: unknown setting {section}.{key}; known: {', '.join(_SCHEMA[section])}"
                )
            attr, typ = _SCHEMA[section][key]
            if isinstance(value, bool) and typ is not bool:
                raise SiteError(f"{path}: {section}.{key} must be a {getattr(typ, '__name__', 'number')}")
            if not isinstance(value, typ):
                raise SiteError(f"{path}: {section}.{key} has the wrong type ({type(value).__name__})")
            if typ is list:
                if not all(isinstance(x, str) for x in value):
                    raise SiteError(f"{path}: {section}.{key} must be a list of strings")
                value = tuple(x.strip().upper() for x in value)
            values[attr] = value
    if "name" not in values or not values["name"].strip():
        raise SiteError(f"{path}: [site] name is required")
    cfg = SiteConfig(**values)
    if cfg.language not in LANGUAGES:
        raise SiteError(f"{path}: site.language must be one of {LANGUAGES}, got {cfg.language!r}")
    if cfg.link_by not in LINK_MODES:
        raise SiteError(f"{path}: ingest.link_by must be one of {LINK_MODES}, got {cfg.link_by!r}")
    if not 16 <= cfg.image_size <= 4096:
        raise SiteError(f"{path}: images.image_size must be between 16 and 4096, got {cfg.image_size}")
    if not 0.0 <= float(cfg.val_fraction) < 1.0:
        raise SiteError(f"{path}: split.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.workers < 1 or cfg.max_image_side < 1 or cfg.max_frames < 1:
        raise SiteError(f"{path}: ingest.workers, max_image_side and max_frames must be positive")
    try:
        "x".encode(cfg.report_encoding)
    except LookupError as exc:
        raise SiteError(
            f"{path}: ingest.report_encoding {cfg.report_encoding!r} is not a known encoding"
        ) from exc
    return cfg


class Site:
    """An opened site directory. `key()` turns an identifier into its keyed hash."""

    def __init__(self, root: Path, config: SiteConfig, secret: bytes, engine: Engine) -> None:
        self.root = root
        self.config = config
        self._secret = secret
        self.engine = engine
        self._sessions = sessionmaker(bind=engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Site({str(self.root)!r}, name={self.config.name!r})"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def session(self) -> Session:
        return self._sessions()

    def key(self, kind: str, value: str | bytes | None) -> str | None:
        """HMAC-SHA256 of an identifier, domain-separated by `kind`; None for a missing identifier."""
        return keyed_hash(self._secret, kind, value)

    @property
    def hash_secret(self) -> bytes:
        """The secret itself, for decoding worker processes that hash identifiers before returning."""
        return self._secret

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Site:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def keyed_hash(secret: bytes, kind: str, value: str | bytes | None) -> str | None:
    """HMAC-SHA256(secret, kind || 0x1f || value) as hex. DICOM pads strings with spaces: strip them."""
    if value is None:
        return None
    raw = value if isinstance(value, bytes) else value.strip().encode("utf-8", "surrogateescape")
    if not raw:
        return None
    return hmac.new(secret, kind.encode() + b"\x1f" + raw, hashlib.sha256).hexdigest()


def patient_split(group_key: str, val_fraction: float) -> str:
    """'val' for a stable `val_fraction` of patients, else 'train'.

    `group_key` is the patient's keyed hash, so the split is stable across runs and re-ingestions and
    needs no stored state, and a patient's images can never land in both splits.
    """
    if val_fraction <= 0:
        return "train"
    u = int(hashlib.sha256(b"vilref-split\x1f" + group_key.encode()).hexdigest()[:15], 16) / 16**15
    return "val" if u < val_fraction else "train"


def _secret_fingerprint(secret: bytes) -> str:
    return hmac.new(secret, b"vilref-site-secret-fingerprint", hashlib.sha256).hexdigest()[:16]


def _read_secret(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
        secret = bytes.fromhex(text)
    except FileNotFoundError as exc:
        raise SiteError(
            f"site secret {path} is missing; restore it from your backup (hashes depend on it)"
        ) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise SiteError(
            f"site secret {path} is corrupt (expected 64 hex characters); restore it from backup"
        ) from exc
    if len(secret) < 16:
        raise SiteError(f"site secret {path} is too short; restore it from backup")
    return secret


def _engine_for(root: Path, cfg: SiteConfig) -> Engine:
    from vilref_fed.store.db import make_engine

    target: str | Path = cfg.database_url or (root / SQLITE_FILE)
    try:
        return make_engine(target)
    except ModuleNotFoundError as exc:
        raise SiteError(
            f"the database driver for storage.database_url is not installed ({exc.name}); "
            "for PostgreSQL install psycopg (`pip install 'psycopg[binary]'`)"
        ) from exc
    except Exception as exc:
        raise SiteError(f"cannot use storage.database_url: {exc}") from exc


def _migrate(engine: Engine) -> None:
    from sqlalchemy.exc import OperationalError

    from vilref_fed.store.site_models import migrate_site_db

    try:
        migrate_site_db(engine)
    except OperationalError as exc:
        raise SiteError(f"cannot open the site database: {str(exc.orig).strip()}") from exc


def init_site(
    site_dir: str | os.PathLike[str],
    name: str,
    language: str = "en",
    database_url: str = "",
    image_size: int = 256,
) -> Site:
    """Create a site directory with documented defaults, a fresh secret and a migrated database."""
    from vilref_fed.store.site_models import SiteMeta

    root = Path(site_dir).resolve()
    if (root / SITE_TOML).exists():
        raise SiteError(f"{root} is already a site (site.toml exists); use it, or choose another --site-dir")
    if not name.strip():
        raise SiteError("the site name must not be empty")
    cfg = SiteConfig(name=name.strip(), language=language, database_url=database_url, image_size=image_size)
    root.mkdir(parents=True, exist_ok=True)
    text = render_site_toml(cfg)
    tmp = root / (SITE_TOML + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    parse_site_toml(tmp)  # validates language/size etc. with the same messages as open_site
    for sub in ("images", "state", "logs"):
        (root / sub).mkdir(exist_ok=True)
    secret_path = root / cfg.secret_file
    if secret_path.exists():
        secret = _read_secret(secret_path)
    else:
        secret = secrets.token_bytes(32)
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secret.hex() + "\n")
    engine = _engine_for(root, cfg)
    _migrate(engine)
    with Session(engine) as s, s.begin():
        existing = s.get(SiteMeta, "secret_fingerprint")
        if existing is not None and existing.value != _secret_fingerprint(secret):
            engine.dispose()
            tmp.unlink(missing_ok=True)
            raise SiteError(
                "the database already belongs to a site with a different secret; use a new database"
            )
        now = datetime.now(UTC).isoformat(timespec="seconds")
        for k, v in (
            ("name", cfg.name),
            ("created_at", now),
            ("secret_fingerprint", _secret_fingerprint(secret)),
        ):
            if s.get(SiteMeta, k) is None:
                s.add(SiteMeta(key=k, value=v))
    os.replace(tmp, root / SITE_TOML)
    return Site(root, cfg, secret, engine)


def open_site(site_dir: str | os.PathLike[str]) -> Site:
    """Open an existing site: parse site.toml, load the secret, upgrade the database schema in place."""
    from vilref_fed.store.site_models import SiteMeta

    root = Path(site_dir).resolve()
    if not (root / SITE_TOML).is_file():
        raise SiteError(
            f"{root} is not a site (no site.toml); create it with `vilref-client init --site-dir {root} "
            "--name NAME`"
        )
    cfg = parse_site_toml(root / SITE_TOML)
    secret = _read_secret(root / cfg.secret_file)
    engine = _engine_for(root, cfg)
    _migrate(engine)
    with Session(engine) as s:
        meta = s.get(SiteMeta, "secret_fingerprint")
        if meta is not None and meta.value != _secret_fingerprint(secret):
            engine.dispose()
            raise SiteError(
                f"{cfg.secret_file} does not match this site's database (hashes would not match); "
                "restore the original secret file"
            )
    for sub in ("images", "state", "logs"):
        (root / sub).mkdir(exist_ok=True)
    return Site(root, cfg, secret, engine)
