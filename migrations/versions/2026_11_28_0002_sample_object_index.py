"""samples.object_index: a window's position inside a batch object

Revision ID: 20261128_0002
Revises: 20261128_0001
Create Date: 2026-11-28 21:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "20261128_0002"
down_revision = "20261128_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.add_column(sa.Column("object_index", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.drop_column("object_index")
