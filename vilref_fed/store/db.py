"""Database engines and a small, explicit migration runner shared by the site and coordinator stores.

SQLite by default (a file in the site or consortium directory), PostgreSQL by URL. Migrations are an
ordered list of functions per schema, applied inside a transaction and recorded in `schema_version`,
so an upgrade of the toolkit upgrades an existing database in place and never drops data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

Migration = Callable[[Connection], None]


def database_url(url_or_path: str | Path) -> str:
    """A SQLAlchemy URL from either a URL (`postgresql+psycopg://...`) or a file path (SQLite)."""
    s = str(url_or_path)
    if "://" in s:
        return s
    return f"sqlite:///{Path(s).resolve()}"


def make_engine(url_or_path: str | Path) -> Engine:
    """Engine with SQLite set for a crash-safe single-writer store: WAL, foreign keys, a busy timeout."""
    url = database_url(url_or_path)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def current_version(conn: Connection, schema: str) -> int:
    conn.execute(
        text(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(schema_name VARCHAR(64) PRIMARY KEY, version INTEGER NOT NULL)"
        )
    )
    row = conn.execute(
        text("SELECT version FROM schema_version WHERE schema_name = :s"), {"s": schema}
    ).first()
    return int(row[0]) if row else 0


def migrate(engine: Engine, schema: str, migrations: Sequence[Migration]) -> int:
    """Apply the migrations after the recorded version, each in its own transaction; returns the version."""
    with engine.begin() as conn:
        version = current_version(conn, schema)
    for i in range(version, len(migrations)):
        with engine.begin() as conn:
            migrations[i](conn)
            if i == 0 and version == 0:
                conn.execute(
                    text("INSERT INTO schema_version (schema_name, version) VALUES (:s, :v)"),
                    {"s": schema, "v": 1},
                )
            else:
                conn.execute(
                    text("UPDATE schema_version SET version = :v WHERE schema_name = :s"),
                    {"s": schema, "v": i + 1},
                )
    return len(migrations)
