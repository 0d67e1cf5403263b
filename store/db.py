"""Engine, sessions and schema upgrades (Alembic) for any SQLAlchemy URL; SQLite by default."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

REPO_ROOT = Path(__file__).resolve().parents[1]
ALEMBIC_DIR = REPO_ROOT / "alembic"


def create_db_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # A round and the API may touch one SQLite file at once: wait instead of failing.
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back (nothing half-written) on error."""
    session = sessionmaker(engine, expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def upgrade_schema(url: str) -> None:
    """Run the Alembic migrations up to head on the database at url."""
    from alembic import command
    from alembic.config import Config

    if not ALEMBIC_DIR.is_dir():
        raise RuntimeError(f"Alembic migrations not found at {ALEMBIC_DIR}; install defect-loop with `pip install -e .`")
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")
