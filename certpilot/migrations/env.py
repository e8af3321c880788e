"""Alembic environment: the engine comes from certpilot.database, never from an ini file."""

from alembic import context
from sqlmodel import SQLModel

import certpilot.models  # noqa: F401  (registers the tables on SQLModel.metadata)

config = context.config
target_metadata = SQLModel.metadata


def _run(connection) -> None:  # noqa: ANN001
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # the caller holds the transaction (and the write lock) and commits
        _run(connection)
        return
    engine = config.attributes["engine"]
    with engine.connect() as connection:
        _run(connection)
        connection.commit()


run_migrations_online()
