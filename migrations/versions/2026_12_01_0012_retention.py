"""Retention: a model version garbage-collected by `edgeloop cloud gc` keeps its row (its
number is never reused, old rollouts still name it) and records when it expired

Revision ID: 20261201_0012
Revises: 20261201_0011
Create Date: 2026-12-01 00:12:00
"""

import sqlalchemy as sa
from alembic import op

revision = "20261201_0012"
down_revision = "20261201_0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "model_versions", sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("model_versions", "expired_at")
