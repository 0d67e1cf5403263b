"""The store: SQLAlchemy 2 models and queries; the single source of truth of a project."""
from store.db import create_db_engine, session_scope, upgrade_schema
from store import models, queries

__all__ = ["create_db_engine", "session_scope", "upgrade_schema", "models", "queries"]
