"""model_versions.baselines: the trigger policies' baselines move out of the gate report

Revision ID: 20261130_0005
Revises: 20261129_0004
Create Date: 2026-11-30 11:00:00
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "20261130_0005"
down_revision = "20261129_0004"
branch_labels = None
depends_on = None

KEYS = ("fleet_anomaly_rate", "label_watermark")
versions = sa.table(
    "model_versions",
    sa.column("id", sa.Integer),
    sa.column("gates", sa.JSON),
    sa.column("baselines", sa.JSON),
)


def _load(value):
    return json.loads(value) if isinstance(value, str) else (value or {})


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("baselines", sa.JSON(), nullable=True))
    conn = op.get_bind()
    for row in conn.execute(sa.select(versions.c.id, versions.c.gates)).all():
        gates = _load(row.gates)
        baselines = {k: gates.pop(k) for k in KEYS if k in gates}
        conn.execute(
            versions.update()
            .where(versions.c.id == row.id)
            .values(gates=gates, baselines=baselines)
        )


def downgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.select(versions.c.id, versions.c.gates, versions.c.baselines)).all()
    for row in rows:
        gates = {**_load(row.gates), **_load(row.baselines)}
        conn.execute(versions.update().where(versions.c.id == row.id).values(gates=gates))
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("baselines")
