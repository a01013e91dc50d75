"""rounds: the round's settings and each stage's attempts and output (a chain of tasks)

Revision ID: 20261129_0004
Revises: 20261128_0003
Create Date: 2026-11-29 01:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "20261129_0004"
down_revision = "20261128_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("config", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("stages", sa.JSON(), nullable=True))
    # Rounds of the single-task era that never finished cannot be resumed stage by stage:
    # mark them failed (their version is taken over by the next round).
    op.execute("UPDATE rounds SET state = 'failed' WHERE state IN ('training', 'registering')")


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("stages")
        batch.drop_column("config")
