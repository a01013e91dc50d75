"""Device identity on the broker: whose MQTT credentials were issued when, and which
devices are revoked (ingest refuses them)

Revision ID: 20261201_0010
Revises: 20261201_0008
Create Date: 2026-12-01 00:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "20261201_0010"
down_revision = "20261201_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as b:
        b.add_column(sa.Column("broker_username", sa.String(length=140), nullable=True))
        b.add_column(sa.Column("credentials_issued_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as b:
        for column in ("revoked_at", "credentials_issued_at", "broker_username"):
            b.drop_column(column)
