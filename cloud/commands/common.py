"""What every command that reads the database shares."""

from __future__ import annotations

import typer
from sqlalchemy.orm import sessionmaker

from shared.errors import EdgeloopError


def sessions() -> sessionmaker:
    """Sessions on the configured database, once its schema is current (else a clear
    error that says to run `edgeloop cloud migrate`)."""
    from cloud.config import get_settings
    from cloud.store.db import require_schema, session_factory

    url = get_settings().resolved_database_url
    try:
        require_schema(url)
    except EdgeloopError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    return session_factory(url)
