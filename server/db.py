"""The coordinator database: sites, runs, rounds, each site's part in each round, and events.

The ServerApp writes it as rounds complete; `vilref-server status/sites/logs/export` and the live
view read it from other processes (SQLite WAL, or PostgreSQL by URL). It is also the source of truth
for resume: a round counts as completed only once its row says so, which happens after its
checkpoint file is safely on disk.

Flower node ids are unsigned 64-bit integers; they are stored as text because SQLite integers are
signed.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from vilref_fed.store.db import make_engine, migrate, session_factory

SCHEMA = "coordinator"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class SiteRow(Base):
    __tablename__ = "sites"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    public_key: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | removed
    node_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    registered: Mapped[int] = mapped_column(Integer, default=0)  # registered in the SuperLink's state
    added_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    removed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    last_seen_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    last_state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_round: Mapped[int | None] = mapped_column(Integer, nullable=True)


class RunRow(Base):
    """A training run; it survives coordinator restarts (each restart is a new attempt)."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|completed|failed|stopped
    rounds_planned: Mapped[int] = mapped_column(Integer)
    config_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[list[AttemptRow]] = relationship(back_populates="run", order_by="AttemptRow.id")
    rounds: Mapped[list[RoundRow]] = relationship(back_populates="run", order_by="RoundRow.round_no")


class AttemptRow(Base):
    """One submission of the run to Flower (`flwr run`); `--resume` makes a new one."""

    __tablename__ = "run_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    flower_run_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    start_round: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(16), default="submitted")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    run: Mapped[RunRow] = relationship(back_populates="attempts")


class RoundRow(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "round_no"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    round_no: Mapped[int] = mapped_column(Integer)
    attempt_id: Mapped[int | None] = mapped_column(ForeignKey("run_attempts.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | completed | failed
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    sites_sampled: Mapped[int] = mapped_column(Integer, default=0)
    sites_accepted: Mapped[int] = mapped_column(Integer, default=0)
    num_examples: Mapped[int] = mapped_column(Integer, default=0)
    bytes_sent: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(Integer, default=0)
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    checkpoint: Mapped[str | None] = mapped_column(Text, nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    run: Mapped[RunRow] = relationship(back_populates="rounds")
    sites: Mapped[list[RoundSiteRow]] = relationship(
        back_populates="round", order_by="RoundSiteRow.site_name"
    )

    @property
    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_json or "{}")


class RoundSiteRow(Base):
    """One site's part in one round: accepted, rejected (bad update), failed, refused or timed out."""

    __tablename__ = "round_sites"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    site_name: Mapped[str] = mapped_column(String(64))
    node_id: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    num_examples: Mapped[int] = mapped_column(Integer, default=0)
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    bytes_sent: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(Integer, default=0)
    update_norm: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    round: Mapped[RoundRow] = relationship(back_populates="sites")

    @property
    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_json or "{}")


class EventRow(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    run_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    round_no: Mapped[int | None] = mapped_column(Integer, nullable=True)
    level: Mapped[str] = mapped_column(String(8), default="info")
    kind: Mapped[str] = mapped_column(String(32))
    site_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str] = mapped_column(Text)


def _m001_create(conn: Connection) -> None:
    Base.metadata.create_all(conn)


MIGRATIONS = [_m001_create]


class CoordinatorDB:
    """Engine + sessions for the coordinator database, migrated on open."""

    def __init__(self, url_or_path: str) -> None:
        self.url = url_or_path
        self.engine = make_engine(url_or_path)
        migrate(self.engine, SCHEMA, MIGRATIONS)
        self._sessions = session_factory(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def close(self) -> None:
        self.engine.dispose()

    # ---- helpers used by several commands
    def event(
        self,
        kind: str,
        message: str,
        level: str = "info",
        run_uid: str | None = None,
        round_no: int | None = None,
        site_name: str | None = None,
    ) -> None:
        with self.session() as s:
            s.add(
                EventRow(
                    kind=kind,
                    message=message,
                    level=level,
                    run_uid=run_uid,
                    round_no=round_no,
                    site_name=site_name,
                )
            )

    def active_sites(self) -> list[SiteRow]:
        with self.session() as s:
            return list(s.scalars(select(SiteRow).where(SiteRow.status == "active").order_by(SiteRow.name)))

    def all_sites(self) -> list[SiteRow]:
        with self.session() as s:
            return list(s.scalars(select(SiteRow).order_by(SiteRow.name)))

    def latest_run(self) -> RunRow | None:
        with self.session() as s:
            return s.scalars(select(RunRow).order_by(RunRow.id.desc()).limit(1)).first()

    def run_by_uid(self, uid: str) -> RunRow | None:
        with self.session() as s:
            return s.scalars(select(RunRow).where(RunRow.uid == uid)).first()

    def completed_rounds(self, run_id: int) -> list[RoundRow]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(RoundRow)
                    .where(RoundRow.run_id == run_id, RoundRow.status == "completed")
                    .order_by(RoundRow.round_no)
                )
            )

    def rounds(self, run_id: int) -> list[RoundRow]:
        with self.session() as s:
            return list(
                s.scalars(select(RoundRow).where(RoundRow.run_id == run_id).order_by(RoundRow.round_no))
            )

    def round_sites(self, round_id: int) -> list[RoundSiteRow]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(RoundSiteRow).where(RoundSiteRow.round_id == round_id).order_by(RoundSiteRow.id)
                )
            )

    def events(self, run_uid: str | None = None, limit: int = 200) -> list[EventRow]:
        with self.session() as s:
            q = select(EventRow).order_by(EventRow.id.desc()).limit(limit)
            if run_uid:
                q = q.where(EventRow.run_uid == run_uid)
            return list(reversed(list(s.scalars(q))))
