"""Alembic environment: runs revisions against EDGELOOP_DATABASE_URL or the given URL."""

from alembic import context

from cloud.config import CloudSettings
from cloud.store.db import Base, make_engine

config = context.config
url = config.get_main_option("sqlalchemy.url") or CloudSettings().resolved_database_url

engine = make_engine(url)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=engine.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
