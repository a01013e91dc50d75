"""Rollouts: who moved the champion alias that started each (MLflow's alias events name no
user; our promote command tags the version with its mover)

Revision ID: 20261201_0011
Revises: 20261201_0010
Create Date: 2026-12-01 00:11:00
"""

import sqlalchemy as sa
from alembic import op

revision = "20261201_0011"
down_revision = "20261201_0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("moved_by", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("moved_by")
