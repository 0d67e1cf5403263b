"""Engine, sessions and schema upgrades (Alembic) for any SQLAlchemy URL; SQLite by default."""
from __future__ import annotations

import fcntl
import filecmp
import os
import re
import shutil
import sqlite3
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

REPO_ROOT = Path(__file__).resolve().parents[1]
# How long a SQLite connection waits for another's write (a round and the API on one file) before failing
SQLITE_BUSY_SECONDS = 30
ALEMBIC_DIR = REPO_ROOT / "alembic"


class StoreUnavailable(RuntimeError):
    """The store cannot be opened: not a database URL, no driver for it, or its server down or refusing. Nothing in
    the store was touched."""


def shown_url(url: str) -> str:
    """The URL with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return repr(url)


def create_db_engine(url: str, *, create_missing_file: bool = True) -> Engine:
    """create_missing_file=False (the API): a SQLite file that is not there is an error, not a new empty store
    (review: a store moved away while `loop serve` ran left an empty loop.db in its place, /health "ok")."""
    try:
        drivername = make_url(url).drivername
    except ArgumentError:
        raise StoreUnavailable(f"the store's URL {url!r} is not a database URL (e.g. sqlite:////path/loop.db or "
                               "postgresql+psycopg://user@host/dbname): check database_url in loop.toml, or LOOP_DATABASE_URL") from None
    try:
        return _create_engine(url, create_missing_file=create_missing_file)
    except (ArgumentError, ImportError) as error:  # an unknown dialect, or its driver not installed
        hint = " (pip install -e '.[postgres]' installs psycopg: postgresql+psycopg://...)" if drivername.startswith("postgresql") else ""
        raise StoreUnavailable(f"no database driver for the store at {shown_url(url)}: {error}{hint}") from None


def _switch_to_wal(cursor, *, wait_seconds: float = SQLITE_BUSY_SECONDS) -> None:  # noqa: ANN001 - a sqlite3 cursor
    """PRAGMA journal_mode=WAL, tried again while the store is locked. Switching a new file to WAL takes its write
    lock, and a connection doing the same at that moment (two commands opening a new store at once) gets "database
    is locked" at once: SQLite skips the busy timeout where waiting could deadlock. Once the file is in WAL mode the
    pragma changes nothing and takes no lock."""
    import sqlite3

    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# libpq defaults for a PostgreSQL store (a URL's own query wins): a server that stops answering, rather than refusing
# (a host gone from the network), failed no request: each waited for TCP's own timeouts, minutes (review: /health
# and every route hung; enough of them would hold the API's every thread)
POSTGRES_CONNECT_DEFAULTS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                             "keepalives_count": 3, "tcp_user_timeout": 30_000}


def _create_engine(url: str, *, create_missing_file: bool = True) -> Engine:
    parsed = make_url(url)
    if url.startswith("sqlite"):
        # A round and the API may touch one SQLite file at once: wait instead of failing.
        database = parsed.database
        if not create_missing_file and database and database != ":memory:" and not database.startswith("file:"):
            store_file = Path(database).resolve()
            only_if_there = f"file:{quote(str(store_file))}?mode=rw"
            engine = create_engine(url, creator=lambda: sqlite3.connect(only_if_there, uri=True, timeout=SQLITE_BUSY_SECONDS,
                                                                       check_same_thread=False))
            _drop_connections_to_a_file_gone(engine, store_file)
        else:
            engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            _switch_to_wal(cursor)
            cursor.close()

        return engine
    if parsed.drivername.startswith("postgresql+psycopg"):
        own = set(parsed.query) | ({"connect_timeout"} if os.environ.get("PGCONNECT_TIMEOUT") else set())  # libpq's variable wins too
        return create_engine(url, pool_pre_ping=True, connect_args={k: v for k, v in POSTGRES_CONNECT_DEFAULTS.items() if k not in own})
    return create_engine(url, pool_pre_ping=True)


def _drop_connections_to_a_file_gone(engine: Engine, store_file: Path) -> None:
    """A pooled connection keeps the file it opened: a store moved or deleted away still answered through it (review:
    /health "ok", and webhook answers written into the moved file). Each checkout compares the file at the store's
    path with the one the connection opened; another file, or none, drops the connection, and the new one the pool
    opens fails as the store's path says (mode=rw: no empty store made)."""
    from sqlalchemy.exc import DisconnectionError

    def identity() -> tuple[int, int] | None:
        try:
            stat = store_file.stat()
        except OSError:
            return None
        return stat.st_dev, stat.st_ino

    @event.listens_for(engine, "connect")
    def _remember(_dbapi_conn, record) -> None:  # noqa: ANN001
        record.info["store_file"] = identity()

    @event.listens_for(engine, "checkout")
    def _still_there(_dbapi_conn, record, _proxy) -> None:  # noqa: ANN001
        now = identity()
        if now is None or now != record.info.get("store_file"):
            raise DisconnectionError(f"the store file {store_file} was moved, replaced or deleted")


# PostgreSQL advisory lock of a store's one project (two int keys: "defl", 1): every folder and machine pointed at the
# store takes the same one, where a project folder's lock file guards that folder only.
STORE_LOCK_KEYS = (0x6465666C, 1)


def _store_lock_keys(connection: Connection) -> dict[str, int]:
    """The advisory lock keys of the store this connection reads: advisory locks are per database, and a database may
    hold stores in several schemas (`?options=-csearch_path=...`; QA: a round in one schema made the other's ingest
    "busy", and its API call a killed round alive). The public schema keeps STORE_LOCK_KEYS, as older releases took."""
    schema = connection.execute(text("select current_schema()")).scalar() or "public"
    if schema == "public":
        return {"a": STORE_LOCK_KEYS[0], "b": STORE_LOCK_KEYS[1]}
    return {"a": STORE_LOCK_KEYS[0], "b": 3 + zlib.crc32(schema.encode()) % (2**31 - 3)}  # never 1 (public) nor 2 (schema changes)


class StoreBusy(RuntimeError):
    """Another process, maybe in another folder or on another machine, writes to this store now."""


class LockFileBusy(RuntimeError):
    """held_lock_file found the lock taken; the message is what its holder wrote ("loop round running as pid 12")."""


@contextmanager
def held_lock_file(path: Path, *, holder: str) -> Iterator[None]:
    """An flock on path for the block, the file naming the holder ("<holder> running as pid N") while held and
    emptied on release; the kernel releases it with the process. LockFileBusy (what the holder wrote) when taken."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise LockFileBusy(handle.read().strip() or "another process") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{holder} running as pid {os.getpid()}")
            handle.flush()
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_file_held(path: Path) -> bool:
    """Whether a live process holds a held_lock_file now, read from the pid it names, without taking the lock (taking
    it even for a moment would make a round starting then fail as busy)."""
    try:
        holder = path.read_text().strip()
    except OSError:
        return False
    match = re.search(r"running as pid (\d+)$", holder)
    if match is None:
        return bool(holder)
    pid = int(match.group(1))
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    try:  # a process started after the holder wrote the file only reuses its pid (a reboot, a long uptime): not the holder
        return not _started_after(pid, path.stat().st_mtime)
    except OSError:
        return True


def _started_after(pid: int, moment: float) -> bool:
    """Whether process pid started after `moment` (seconds since the epoch); False when /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime, in clock ticks since boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    # 60 s: btime follows the wall clock when it is stepped (NTP's first sync, a VM resumed) and an NFS mtime is the
    # server's clock; a reused pid belongs to a process started long after (a reboot)
    return boot + start_ticks / os.sysconf("SC_CLK_TCK") > moment + 60.0


def _sqlite_lock_path(engine: Engine) -> Path | None:
    """The lock file beside a SQLite store's file (None: in memory, or not SQLite)."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database).resolve()
    return path.with_name(path.name + ".lock")


@contextmanager
def exclusive_store_lock(engine: Engine) -> Iterator[None]:
    """Held while a round or an ingest writes, by every folder and machine that points at the store. PostgreSQL: an
    advisory lock on a connection kept open meanwhile (released when it closes, so a killed process never leaves it
    behind). SQLite: an flock on a file beside the database file (the kernel releases it with the process), which
    guards a loop.db shared by several folders through database_url; the usual loop.db in its own folder gets it
    too, beside the folder's lock. A long command calls confirm_store_lock between its steps."""
    lock_path = _sqlite_lock_path(engine)
    if lock_path is not None:
        with ExitStack() as stack:
            try:
                stack.enter_context(held_lock_file(lock_path, holder="a loop round or ingest"))
            except LockFileBusy as busy:
                raise StoreBusy(f"the store {lock_path.with_suffix('')} is busy: {busy}, from another project folder. Wait for it "
                                "to finish (nothing was changed).") from None
            yield
        return
    if engine.dialect.name != "postgresql":
        yield
        return
    connection = engine.connect()
    holder: list[Connection | None] = [connection]  # confirm_store_lock swaps in the connection that took it again
    try:
        keys = _store_lock_keys(connection)
        got = connection.execute(text("select pg_try_advisory_lock(:a, :b)"), keys).scalar()
        connection.commit()
        if not got:
            raise StoreBusy(f"the store at {shown_url(engine.url.render_as_string(hide_password=False))} is busy: another loop round or "
                            "ingest writes to it now, from another project folder or machine. Wait for it to finish (nothing was changed).")
        _held_store_locks[id(engine)] = (holder, keys)
        try:
            yield
        finally:
            _held_store_locks.pop(id(engine), None)
            if holder[0] is not None:  # None: lost, and not taken again
                try:
                    holder[0].execute(text("select pg_advisory_unlock(:a, :b)"), keys)
                    holder[0].commit()
                except DBAPIError:  # the connection dropped (server restart, idle timeout): its lock went with it
                    holder[0].invalidate()
                holder[0].close()
    finally:
        connection.close()  # a no-op when it was the holder


# engine id -> [the connection holding its PostgreSQL store lock], while exclusive_store_lock's block runs
_held_store_locks: dict[int, tuple[list[Connection | None], dict[str, int]]] = {}  # and the keys it holds (_store_lock_keys)


def confirm_store_lock(engine: Engine) -> bool:
    """Inside exclusive_store_lock (PostgreSQL): whether the lock had to be taken again. A server restart or an idle-
    session timeout drops the lock's connection and the lock with it, and another folder could start a round; a
    round calls this between its steps. Lost and free: taken again on a new connection (True). Lost and held by
    another process: StoreBusy, so the two do not interleave their writes. False: still held, or nothing to confirm
    (SQLite's flock cannot be lost; no lock taken in this process)."""
    holder, keys = _held_store_locks.get(id(engine), (None, {}))
    if holder is None:
        return False
    if holder[0] is not None:  # None: lost before, and held by another then
        try:
            held = holder[0].execute(text(
                "select count(*) from pg_locks where locktype = 'advisory' and granted and pid = pg_backend_pid() "
                "and classid = :a and objid = :b and objsubid = 2"), keys).scalar()
            holder[0].commit()
            if held:
                return False
        except DBAPIError:
            holder[0].invalidate()
        holder[0].close()
        holder[0] = None
    connection = engine.connect()  # the store itself gone: the round's next step would fail the same way
    try:
        got = connection.execute(text("select pg_try_advisory_lock(:a, :b)"), keys).scalar()
        connection.commit()
    except BaseException:
        connection.close()
        raise
    if not got:
        connection.close()
        raise StoreBusy(f"lost the lock on the store at {shown_url(engine.url.render_as_string(hide_password=False))} (its connection "
                        "was dropped: a server restart or an idle-session timeout), and another loop round or ingest holds it now: "
                        "stopped here so that the two do not write at once")
    holder[0] = connection
    return True


def store_lock_held(engine: Engine) -> bool | None:
    """Whether some process holds exclusive_store_lock now, read without taking it (taking it even for a moment would
    make a round starting then fail as busy): PostgreSQL's pg_locks; SQLite's lock file names the holder's pid while
    held. None: not known for this kind of store."""
    lock_path = _sqlite_lock_path(engine)
    if lock_path is not None:
        return lock_file_held(lock_path)
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as connection:
        return bool(connection.execute(text(  # advisory locks are per database; pg_locks lists the whole server's
            "select count(*) from pg_locks where locktype = 'advisory' and granted and classid = :a and objid = :b and objsubid = 2 "
            "and database = (select oid from pg_database where datname = current_database())"),
            _store_lock_keys(connection)).scalar())


def database_error_reason(error: BaseException) -> str:
    """The driver's own first line for a database error (SQLAlchemy's text adds the SQL and a link), for messages."""
    text_of = str(getattr(error, "orig", None) or error).strip()
    return text_of.splitlines()[0] if text_of else type(error).__name__


def store_connection_lost(error: BaseException) -> bool:
    """Whether a database error means the store went away (server stopped or restarting, network, connection killed),
    not a bug, a schema problem, a lock timeout or a full disk, which must show as what they are. A SQLite store is
    lost when its file cannot be opened any more."""
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    orig = error.orig
    if orig is not None and type(orig).__module__.startswith("sqlite3"):
        # the file moved or deleted while in use (the API opens it without creating it): gone, as a server can be
        return isinstance(orig, sqlite3.OperationalError) and "unable to open database file" in str(orig)
    if orig is None:
        return False
    sqlstate = getattr(orig, "sqlstate", None)
    # no SQLSTATE: the client could not talk to the server at all; 08: connection exception; 57P01-03: shutdown
    return isinstance(error, (OperationalError, InterfaceError)) and (sqlstate is None or sqlstate.startswith("08")
                                                                       or sqlstate in ("57P01", "57P02", "57P03"))


def store_url_for(root: Path, configured: str | None, *, use_env: bool = True) -> str:
    """The store a project folder's commands use: LOOP_DATABASE_URL (when `use_env`), else its loop.toml's
    database_url (`configured`), else its own SQLite file, loop.db."""
    return (os.environ.get("LOOP_DATABASE_URL") if use_env else None) or configured or f"sqlite:///{(root / 'loop.db').resolve()}"


def same_store(first: str, second: str) -> bool:
    """Whether two URLs name one store, however written (a SQLite path with ./ or a symlink, an explicit default port)."""
    try:
        a, b = make_url(first), make_url(second)
    except ArgumentError:
        return first == second
    if a.get_backend_name() == "sqlite" and b.get_backend_name() == "sqlite":
        return bool(a.database and b.database) and Path(a.database).resolve() == Path(b.database).resolve()
    default_ports = {"postgresql": 5432, "mysql": 3306}
    def key(url):  # noqa: ANN001, ANN202
        return (url.get_backend_name(), url.username, url.password, url.host, url.port or default_ports.get(url.get_backend_name()), url.database)
    return key(a) == key(b)


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


LOW_DISK_BYTES = 1 << 20  # free space under which a SQLite store's "disk I/O error" is said to be a full disk too


def _what_to_check(url: str) -> str:
    """Where to look when the store does not open: a SQLite file has no server (QA: a file this user could not write
    was sent to look for one), and SQLite writes beside it even to read (its -wal and -shm files); a full disk gives
    the same "disk I/O error" (QA: sent to check permissions with 8 KB left)."""
    if url.startswith("sqlite"):
        free = sqlite_disk_free(url)
        full = (f"The disk holding it has {free // 1024} KB free: free space there first (SQLite needs room for its -wal and -shm files "
                "even to read). Else check" if free is not None and free < LOW_DISK_BYTES else "Check")
        return (f"{full} that this user can read and write the file and its folder (SQLite writes its -wal and -shm files beside it, "
                "even to read) and database_url in loop.toml (or LOOP_DATABASE_URL)")
    return "Check that the database server runs and database_url in loop.toml (or LOOP_DATABASE_URL)"


def sqlite_disk_free(url: str) -> int | None:
    """Free bytes on the file system of a SQLite store's folder; None: not a SQLite file URL, or it cannot be read."""
    try:
        database = make_url(url).database if url.startswith("sqlite") else None
        if not database or database == ":memory:":
            return None
        folder = Path(database.split("?")[0]).expanduser().resolve().parent
        return shutil.disk_usage(folder).free
    except (ArgumentError, OSError, ValueError):
        return None


def store_disk_full(error: BaseException) -> bool:
    """Whether a database error is the store's disk full: SQLite's SQLITE_FULL, PostgreSQL's disk_full (53100)."""
    if not isinstance(error, DBAPIError) or error.orig is None:
        return False
    return "database or disk is full" in str(error.orig) or getattr(error.orig, "sqlstate", None) == "53100"


def store_is_read_only(error: BaseException) -> bool:
    """Whether a database error is SQLite refusing to write: the file, or its folder, read-only for this user or mount."""
    return "readonly database" in database_error_reason(error)


def upgrade_schema(url: str, *, lock_files: tuple[Path, ...] = ()) -> None:
    """Run the Alembic migrations up to head on the database at url. A store already at head is only read (every
    command calls this: it must not queue behind a running round's writes); an upgrade waits for any other process
    upgrading the same store (hold_schema_lock in alembic/env.py), then finds the work done.

    A store made by an older defect-loop is upgraded for good: older releases cannot open it after. So it is said
    (stderr), a SQLite file is copied first (`loop.db.schema-<revision>.bak`), and nothing is upgraded while a round
    or an ingest holds the store's lock or one of `lock_files` (an older release still running on it: QA, its next
    command crashed). A store from a newer release, or a read-only one that needs the upgrade, is one clear error."""
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from alembic import command

    if not ALEMBIC_DIR.is_dir():
        raise RuntimeError(f"Alembic migrations not found at {ALEMBIC_DIR}; install defect-loop with `pip install -e .`")
    config = alembic_config(url)
    engine = create_db_engine(url)  # a bad URL or a missing driver, said as such
    try:
        with engine.connect() as connection:  # the first connection of every command: the server down or refusing, said as such
            current = set(MigrationContext.configure(connection).get_current_heads())
    except OperationalError as error:
        reason = database_error_reason(error)
        raise StoreUnavailable(f"cannot open the store at {shown_url(url)}: {reason}. {_what_to_check(url)}; nothing was changed") from None
    finally:
        engine.dispose()
    scripts = ScriptDirectory.from_config(config)
    heads = set(scripts.get_heads())
    if current == heads:
        return
    known = {revision.revision for revision in scripts.walk_revisions()}
    if current - known:  # Alembic's own error was a 100-line traceback (QA)
        raise StoreUnavailable(f"the store at {shown_url(url)} was made or upgraded by a newer defect-loop (schema {', '.join(sorted(current - known))}; "
                               f"this release knows up to {', '.join(sorted(heads))}): use that release, or a copy of the store from before "
                               "its upgrade; nothing was changed")
    database = make_url(url).database if url.startswith("sqlite") else None
    store_file = Path(database).resolve() if database and database != ":memory:" and not database.startswith("file:") else None
    if current:  # an existing store, not a new one
        lock_path = None if store_file is None else store_file.with_name(store_file.name + ".lock")
        busy = [str(path) for path in (*lock_files, *([lock_path] if lock_path else [])) if lock_file_held(path)]
        if not busy and url.startswith("postgresql") and _postgres_store_lock_held(url):  # a round from another folder or machine
            busy = ["the store's lock (a round or ingest from another folder or machine)"]
        if busy:
            raise StoreUnavailable(f"the store at {shown_url(url)} needs a schema upgrade ({', '.join(sorted(current))} to {', '.join(sorted(heads))}), and "
                                   f"a round or ingest holds {busy[0]}: an older defect-loop may be running on it, which could not open it "
                                   "after. Run this again when it has finished; nothing was changed")
    backup = _copy_before_upgrade(url, store_file, current, heads) if current and store_file is not None and store_file.is_file() else None
    try:
        command.upgrade(config, "head")  # an error in a migration itself is not "cannot open": it stays a traceback
    except OperationalError as error:
        if not store_is_read_only(error):
            raise
        if backup is not None:  # nothing was changed: not even a copy left behind
            backup.unlink(missing_ok=True)
        raise StoreUnavailable(f"the store at {shown_url(url)} needs a schema upgrade ({', '.join(sorted(current)) or 'none'} to {', '.join(sorted(heads))}, "
                               f"made by a newer defect-loop), which writes to it, and it is read-only ({database_error_reason(error)}). "
                               f"{_what_to_check(url)}; nothing was changed") from None
    if current and (backup is not None or store_file is None):  # said once done, by the command that made the copy
        sys.stderr.write(f"note: upgraded the store at {shown_url(url)} from schema {', '.join(sorted(current))} to {', '.join(sorted(heads))} "
                         "(a newer defect-loop); releases before it can no longer open it"
                         + (f". Its copy from before: {backup}\n" if backup else
                            " (no copy was made of this store: keep one from before if a teammate still runs an older release)\n"))


def _copy_before_upgrade(url: str, store_file: Path, current: set[str], heads: set[str]) -> Path | None:
    """A copy of a SQLite store at its old schema, `<file>.schema-<revision>.bak`, made before its upgrade: an older
    release's user works on it. Written beside as a temporary file and linked into place only when it holds the old
    revision and no such copy is there yet (review: two commands starting at once both copied, and the second one's
    copy was of the store already upgraded). None: another command upgraded the store meanwhile, or made the copy.
    A copy at that revision left by an earlier upgrade whose content differs (the store was rolled back to that
    revision and written since) stays, and this one takes the time in its name (QA: the second upgrade made no copy
    and said nothing)."""
    from alembic.migration import MigrationContext

    backup = store_file.with_name(f"{store_file.name}.schema-{'-'.join(sorted(current))}.bak")
    partial = store_file.with_name(f".{backup.name}.{os.getpid()}.partial")
    try:
        _copy_sqlite(store_file, partial)
        copied = create_db_engine(f"sqlite:///{partial}")
        try:
            with copied.connect() as connection:
                revision = set(MigrationContext.configure(connection).get_current_heads())
        finally:
            copied.dispose()
        if revision != current:
            return None
        if backup.exists():
            if filecmp.cmp(partial, backup, shallow=False):  # made by another command at this moment (or the same state): kept
                return None
            # an earlier upgrade's copy, and the store was rolled back to that revision and written since: this copy gets
            # the time in its name (QA: the second upgrade made no copy and said nothing). By content, not file times:
            # another command's upgrade connection touches loop.db-wal before it changes anything (review)
            backup = backup.with_name(f"{store_file.name}.schema-{'-'.join(sorted(current))}.{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.bak")
        try:
            os.link(partial, backup)
        except FileExistsError:  # another command starting at the same moment copied it (or an earlier attempt): kept, and
            return None          # that command says so (QA: two commands both printed the note)
        except OSError:  # a file system without hard links (SMB, exFAT): created only where none is, then written
            try:
                with open(backup, "xb") as target, open(partial, "rb") as source:
                    shutil.copyfileobj(source, target)
            except FileExistsError:
                return None
        return backup
    except (OSError, sqlite3.Error, OperationalError) as error:
        raise StoreUnavailable(f"the store at {shown_url(url)} needs a schema upgrade ({', '.join(sorted(current))} to {', '.join(sorted(heads))}), and "
                               f"a copy of it from before could not be written to {backup} ({error}): make its folder writable; nothing was changed") from None
    finally:
        for leftover in (partial, partial.with_name(partial.name + "-wal"), partial.with_name(partial.name + "-shm")):
            leftover.unlink(missing_ok=True)


def _postgres_store_lock_held(url: str) -> bool:
    """Whether a round or ingest holds a PostgreSQL store's lock (exclusive_store_lock) now, read from pg_locks without
    taking it (review: taking it for a moment made a round starting then fail as busy)."""
    engine = create_db_engine(url)
    try:
        return bool(store_lock_held(engine))
    finally:
        engine.dispose()


def _copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite store (its -wal included), through SQLite's backup API. The source by its file: URI,
    escaped (review: a '#' in the folder's path cut the path there, and an empty database was copied)."""
    reading = sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True)
    writing = sqlite3.connect(target)
    try:
        reading.backup(writing)
    finally:
        writing.close()
        reading.close()


# PostgreSQL advisory lock taken inside a transaction that changes the store's schema or makes its project row
SCHEMA_LOCK_KEYS = (0x6465666C, 2)


def hold_schema_lock(connection: Connection) -> None:
    """Called first in a transaction of connection: waits for another process's schema upgrade or new project row on
    the same store to commit, and holds the next one off until this transaction ends, so two commands starting at
    once (two `loop init`, or a round and `loop serve` after an upgrade of defect-loop) do not both create the
    tables or both add a project. PostgreSQL: a transaction-level advisory lock. SQLite: BEGIN IMMEDIATE, its write
    lock taken before the first read (readers go on: the store is in WAL mode)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("select pg_advisory_xact_lock(:a, :b)"), {"a": SCHEMA_LOCK_KEYS[0], "b": SCHEMA_LOCK_KEYS[1]})
    elif connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # pysqlite starts no transaction before DDL or a SELECT by itself


def alembic_config(url: str):  # noqa: ANN201  (alembic.config.Config, imported here only)
    """Alembic's configuration for the store at url: the repository's migrations (for upgrades, and for tests that
    step a store down to an older revision)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config
