"""Ingest members: each ingest process records its MQTT client id, replica slot and last
batch (the broker keeps no list of a shared-subscription group's members), and the payloads
an ingest died on (ingest_suspects)

Revision ID: 20261201_0013
Revises: 20261201_0012
Create Date: 2026-12-01 00:13:00
"""

import sqlalchemy as sa
from alembic import op

revision = "20261201_0013"
down_revision = "20261201_0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingest_members",
        sa.Column("client_id", sa.String(200), primary_key=True),
        sa.Column("group", sa.String(64), nullable=False),
        sa.Column("fleet", sa.String(64), nullable=False),
        sa.Column("slot", sa.Integer, nullable=False),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("token", sa.String(32), nullable=False),
        sa.Column("session_expiry_s", sa.BigInteger, nullable=False),
        sa.Column("heartbeat_s", sa.Float, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_batch_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stored", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("received", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("inflight", sa.JSON, nullable=False, server_default="[]"),
    )
    op.create_table(
        "ingest_suspects",
        sa.Column("payload_sha256", sa.String(64), primary_key=True),
        sa.Column("crashes", sa.Integer, nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ingest_suspects")
    op.drop_table("ingest_members")
