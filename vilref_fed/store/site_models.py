"""The site database: what was ingested, what was refused, which report belongs to which image.

Column types are the portable SQLAlchemy ones (String, Text, Integer, BigInteger, Boolean, DateTime,
JSON) so the same models run on SQLite and PostgreSQL. Every identifier column holds a keyed hash
(`*_key`, 64 hex characters), never the identifier. Report text is stored exactly as read: training
needs it, and it never leaves the site.

Schema changes are migrations (`MIGRATIONS`, applied by `vilref_fed.store.db.migrate`). Migration 1 is a
frozen copy of the version-1 tables, so that later ORM changes become migration 2, 3, ... and an old
site database is upgraded in place; a test checks the migrated schema equals these models.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_NAME = "site"
KEY = String(64)  # hex HMAC-SHA256 / SHA-256


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class SiteMeta(Base):
    """Site facts: name, creation time, fingerprint of the secret (detects a swapped secret file)."""

    __tablename__ = "site_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class IngestRun(Base):
    __tablename__ = "ingest_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    counts: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class SourceFile(Base):
    """One input file, once processed (the unit of resumption: skipped when size and mtime still match)."""

    __tablename__ = "source_files"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path_key: Mapped[str] = mapped_column(KEY, unique=True)
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(String(16))  # accepted | duplicate | quarantined
    frames: Mapped[int] = mapped_column(Integer, default=0)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("ingest_runs.id"), nullable=True)
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Image(Base):
    """An accepted frame in canonical form: images/<image_key[:2]>/<image_key>.png."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("sop_key", "frame_index", name="uq_images_sop_frame"),
        Index("ix_images_accession_key", "accession_key"),
        Index("ix_images_study_key", "study_key"),
        Index("ix_images_patient_key", "patient_key"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_key: Mapped[str] = mapped_column(KEY, unique=True)
    source_file_id: Mapped[int] = mapped_column(ForeignKey("source_files.id"))
    frame_index: Mapped[int] = mapped_column(Integer, default=0)
    sop_key: Mapped[str] = mapped_column(KEY)
    study_key: Mapped[str | None] = mapped_column(KEY, nullable=True)
    series_key: Mapped[str | None] = mapped_column(KEY, nullable=True)
    patient_key: Mapped[str | None] = mapped_column(KEY, nullable=True)
    accession_key: Mapped[str | None] = mapped_column(KEY, nullable=True)
    laterality: Mapped[str | None] = mapped_column(String(1), nullable=True)
    acquisition_date: Mapped[str | None] = mapped_column(String(8), nullable=True)
    manufacturer: Mapped[str | None] = mapped_column(String(128), nullable=True)
    model_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    sop_class: Mapped[str | None] = mapped_column(String(128), nullable=True)
    transfer_syntax: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[int] = mapped_column(Integer)
    file_name: Mapped[str] = mapped_column(String(160))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Duplicate(Base):
    """A frame recorded once already: same SOP Instance UID, or identical canonical pixels."""

    __tablename__ = "duplicates"
    __table_args__ = (UniqueConstraint("source_file_id", "frame_index", name="uq_duplicates_file_frame"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_file_id: Mapped[int] = mapped_column(ForeignKey("source_files.id"))
    frame_index: Mapped[int] = mapped_column(Integer, default=0)
    kind: Mapped[str] = mapped_column(String(16))  # sop_instance | pixels
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Quarantine(Base):
    __tablename__ = "quarantine"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_file_id: Mapped[int] = mapped_column(ForeignKey("source_files.id"), unique=True)
    reason: Mapped[str] = mapped_column(String(32), index=True)
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Report(Base):
    """A diagnostic report row. Labels here are for the report's own eye (or the whole report)."""

    __tablename__ = "reports"
    __table_args__ = (
        Index("ix_reports_accession_key", "accession_key"),
        Index("ix_reports_study_key", "study_key"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_key: Mapped[str] = mapped_column(KEY, unique=True)
    source_key: Mapped[str] = mapped_column(KEY)
    source_name: Mapped[str | None] = mapped_column(Text, nullable=True)
    line: Mapped[int] = mapped_column(Integer)
    accession_key: Mapped[str | None] = mapped_column(KEY, nullable=True)
    study_key: Mapped[str | None] = mapped_column(KEY, nullable=True)
    eye: Mapped[str | None] = mapped_column(String(2), nullable=True)
    text: Mapped[str] = mapped_column(Text)
    text_sha256: Mapped[str] = mapped_column(KEY)
    positive: Mapped[list[str]] = mapped_column(JSON)
    uncertain: Mapped[list[str]] = mapped_column(JSON)
    negated: Mapped[list[str]] = mapped_column(JSON)
    label_vector: Mapped[list[int]] = mapped_column(JSON)
    ontology_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReportIssue(Base):
    """A CSV row that was not ingested (malformed, empty, no key, bad eye, duplicate), by file and line."""

    __tablename__ = "report_issues"
    __table_args__ = (UniqueConstraint("source_key", "line", "kind", name="uq_report_issues_line_kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_key: Mapped[str] = mapped_column(KEY)
    source_name: Mapped[str | None] = mapped_column(Text, nullable=True)
    line: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("ingest_runs.id"), nullable=True)


class ImageReport(Base):
    """The report that describes an image, with label states for that image's eye and the training vector."""

    __tablename__ = "image_reports"
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), index=True)
    eye: Mapped[str | None] = mapped_column(String(2), nullable=True)
    positive: Mapped[list[str]] = mapped_column(JSON)
    uncertain: Mapped[list[str]] = mapped_column(JSON)
    negated: Mapped[list[str]] = mapped_column(JSON)
    label_vector: Mapped[list[int]] = mapped_column(JSON)
    ontology_hash: Mapped[str] = mapped_column(String(64))
    linked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def _v1_tables(md: MetaData) -> None:
    """The version-1 schema, frozen. Never edit: add a migration instead."""
    key = String(64)
    tz = DateTime(timezone=True)
    Table("site_meta", md, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))
    Table(
        "ingest_runs",
        md,
        Column("id", Integer, primary_key=True),
        Column("started_at", tz, nullable=False),
        Column("finished_at", tz),
        Column("status", String(16), nullable=False),
        Column("counts", JSON),
    )
    Table(
        "source_files",
        md,
        Column("id", Integer, primary_key=True),
        Column("path_key", key, nullable=False, unique=True),
        Column("path", Text),
        Column("size", BigInteger, nullable=False),
        Column("mtime_ns", BigInteger, nullable=False),
        Column("outcome", String(16), nullable=False),
        Column("frames", Integer, nullable=False),
        Column("run_id", Integer, ForeignKey("ingest_runs.id")),
        Column("processed_at", tz, nullable=False),
    )
    Table(
        "images",
        md,
        Column("id", Integer, primary_key=True),
        Column("image_key", key, nullable=False, unique=True),
        Column("source_file_id", Integer, ForeignKey("source_files.id"), nullable=False),
        Column("frame_index", Integer, nullable=False),
        Column("sop_key", key, nullable=False),
        Column("study_key", key),
        Column("series_key", key),
        Column("patient_key", key),
        Column("accession_key", key),
        Column("laterality", String(1)),
        Column("acquisition_date", String(8)),
        Column("manufacturer", String(128)),
        Column("model_name", String(128)),
        Column("modality", String(16)),
        Column("sop_class", String(128)),
        Column("transfer_syntax", String(64)),
        Column("rows", Integer, nullable=False),
        Column("columns", Integer, nullable=False),
        Column("file_name", String(160), nullable=False),
        Column("created_at", tz, nullable=False),
        UniqueConstraint("sop_key", "frame_index", name="uq_images_sop_frame"),
        Index("ix_images_accession_key", "accession_key"),
        Index("ix_images_study_key", "study_key"),
        Index("ix_images_patient_key", "patient_key"),
    )
    Table(
        "duplicates",
        md,
        Column("id", Integer, primary_key=True),
        Column("source_file_id", Integer, ForeignKey("source_files.id"), nullable=False),
        Column("frame_index", Integer, nullable=False),
        Column("kind", String(16), nullable=False),
        Column("image_id", Integer, ForeignKey("images.id"), nullable=False),
        Column("created_at", tz, nullable=False),
        UniqueConstraint("source_file_id", "frame_index", name="uq_duplicates_file_frame"),
    )
    Table(
        "quarantine",
        md,
        Column("id", Integer, primary_key=True),
        Column("source_file_id", Integer, ForeignKey("source_files.id"), nullable=False, unique=True),
        Column("reason", String(32), nullable=False, index=True),
        Column("message", Text, nullable=False),
        Column("created_at", tz, nullable=False),
    )
    Table(
        "reports",
        md,
        Column("id", Integer, primary_key=True),
        Column("report_key", key, nullable=False, unique=True),
        Column("source_key", key, nullable=False),
        Column("source_name", Text),
        Column("line", Integer, nullable=False),
        Column("accession_key", key),
        Column("study_key", key),
        Column("eye", String(2)),
        Column("text", Text, nullable=False),
        Column("text_sha256", key, nullable=False),
        Column("positive", JSON, nullable=False),
        Column("uncertain", JSON, nullable=False),
        Column("negated", JSON, nullable=False),
        Column("label_vector", JSON, nullable=False),
        Column("ontology_hash", String(64), nullable=False),
        Column("created_at", tz, nullable=False),
        Column("updated_at", tz, nullable=False),
        Index("ix_reports_accession_key", "accession_key"),
        Index("ix_reports_study_key", "study_key"),
    )
    Table(
        "report_issues",
        md,
        Column("id", Integer, primary_key=True),
        Column("source_key", key, nullable=False),
        Column("source_name", Text),
        Column("line", Integer, nullable=False),
        Column("kind", String(32), nullable=False),
        Column("message", Text, nullable=False),
        Column("run_id", Integer, ForeignKey("ingest_runs.id")),
        UniqueConstraint("source_key", "line", "kind", name="uq_report_issues_line_kind"),
    )
    Table(
        "image_reports",
        md,
        Column("image_id", Integer, ForeignKey("images.id"), primary_key=True),
        Column("report_id", Integer, ForeignKey("reports.id"), nullable=False, index=True),
        Column("eye", String(2)),
        Column("positive", JSON, nullable=False),
        Column("uncertain", JSON, nullable=False),
        Column("negated", JSON, nullable=False),
        Column("label_vector", JSON, nullable=False),
        Column("ontology_hash", String(64), nullable=False),
        Column("linked_at", tz, nullable=False),
    )


def _migration_1(conn: Connection) -> None:
    md = MetaData()
    _v1_tables(md)
    md.create_all(conn)


MIGRATIONS = [_migration_1]


def migrate_site_db(engine: Engine) -> int:
    """Bring a site database to the current schema version (idempotent)."""
    from vilref_fed.store.db import migrate

    return migrate(engine, SCHEMA_NAME, MIGRATIONS)
