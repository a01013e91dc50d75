"""Delta updates: the deltas made between versions (lineage) and, per device update, what
was offered and received

Revision ID: 20261130_0007
Revises: 20261130_0006
Create Date: 2026-11-30 19:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "20261130_0007"
down_revision = "20261130_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deltas",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("fleet", sa.String(length=64), nullable=False),
        sa.Column("profile", sa.String(length=64), nullable=False),
        sa.Column("base_version", sa.String(length=64), nullable=False),
        sa.Column("target_version", sa.String(length=64), nullable=False),
        sa.Column("base_sha256", sa.String(length=64), nullable=False),
        sa.Column("target_sha256", sa.String(length=64), nullable=False),
        sa.Column("object_key", sa.String(length=200), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("length", sa.Integer(), nullable=True),
        sa.Column("target_length", sa.Integer(), nullable=False),
        sa.Column("stats", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "fleet", "profile", "base_sha256", "target_sha256", name="uq_delta_pair"
        ),
    )
    op.create_index("ix_deltas_fleet", "deltas", ["fleet"])
    with op.batch_alter_table("device_updates") as b:
        b.add_column(sa.Column("payload", sa.String(length=16), nullable=True))
        b.add_column(sa.Column("payload_bytes", sa.Integer(), nullable=True))
        b.add_column(sa.Column("received_bytes", sa.Integer(), nullable=True))
        b.add_column(sa.Column("delta_refused", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device_updates") as b:
        for column in ("delta_refused", "received_bytes", "payload_bytes", "payload"):
            b.drop_column(column)
    op.drop_index("ix_deltas_fleet", table_name="deltas")
    op.drop_table("deltas")
