"""Hostile input at ingest: per-device token buckets (rate limits shared by every ingest
process) and capped dead letters (a payload prefix, its full length and sha256, and the
dead letters counted but not stored past a device's hourly cap)

Revision ID: 20261201_0008
Revises: 20261130_0007
Create Date: 2026-12-01 00:08:00
"""

import sqlalchemy as sa
from alembic import op

revision = "20261201_0008"
down_revision = "20261130_0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingest_buckets",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("bytes_tokens", sa.Float(), nullable=False),
        sa.Column("message_tokens", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )
    with op.batch_alter_table("dead_letters") as b:
        b.add_column(sa.Column("payload_bytes", sa.Integer(), nullable=True))
        b.add_column(sa.Column("payload_sha256", sa.String(length=64), nullable=True))
        b.add_column(sa.Column("suppressed", sa.JSON(), nullable=True))
    op.create_index(
        "ix_dead_letters_device_received", "dead_letters", ["device_id", "received_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_dead_letters_device_received", table_name="dead_letters")
    with op.batch_alter_table("dead_letters") as b:
        b.drop_column("suppressed")
        b.drop_column("payload_sha256")
        b.drop_column("payload_bytes")
    op.drop_table("ingest_buckets")
