from sqlalchemy import create_engine, pool

from alembic import context
from store.db import hold_schema_lock
from store.models import Base

config = context.config
url_override = context.get_x_argument(as_dictionary=True).get("url")
if url_override:
    config.set_main_option("sqlalchemy.url", url_override)
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    # SQLite: wait for a round's write as the store's engine does, but without its foreign_keys pragma, which batch
    # mode's table copies would trip
    engine = create_engine(url, poolclass=pool.NullPool, **({"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}))
    try:
        # One transaction of our own for every step (alembic then manages none): it first waits for another process
        # upgrading this store, so two never both create a table; SQLite's DDL is transactional too.
        with engine.connect() as connection, connection.begin():
            hold_schema_lock(connection)
            # render_as_batch: SQLite can only ALTER tables by copying them.
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
            context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
