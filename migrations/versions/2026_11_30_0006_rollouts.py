"""Rollouts from the registry: fleets (allow-list, release counter), enrollment fields on
devices, wave state on rollouts, per-rollout device updates

Revision ID: 20261130_0006
Revises: 20261130_0005
Create Date: 2026-11-30 16:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "20261130_0006"
down_revision = "20261130_0005"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "fleets",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("release", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("devices") as b:
        b.add_column(sa.Column("site", sa.String(length=64), nullable=True))
        b.add_column(sa.Column("tags", sa.JSON(), nullable=False, server_default="{}"))
        b.add_column(sa.Column("agent_version", sa.String(length=64), nullable=True))
        b.add_column(sa.Column("capabilities", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("rollouts") as b:
        b.add_column(sa.Column("target_version", sa.String(64), nullable=False, server_default=""))
        b.add_column(sa.Column("mlflow_version", sa.String(32), nullable=True))
        b.add_column(sa.Column("trigger", sa.String(32), nullable=False, server_default="alias"))
        b.add_column(sa.Column("wave", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("plan", sa.JSON(), nullable=False, server_default="[]"))
        b.add_column(sa.Column("params", sa.JSON(), nullable=False, server_default="{}"))
        b.add_column(sa.Column("health", sa.JSON(), nullable=False, server_default="{}"))
        b.add_column(sa.Column("reason", sa.Text(), nullable=False, server_default=""))
        b.add_column(sa.Column("mlflow_run_id", sa.String(64), nullable=True))
        b.add_column(sa.Column("release", sa.Integer(), nullable=True))
        b.add_column(sa.Column("wave_started_at", TZ, nullable=True))
        b.add_column(sa.Column("finished_at", TZ, nullable=True))
        b.create_index("ix_rollouts_fleet", ["fleet"])
    with op.batch_alter_table("device_updates") as b:
        b.drop_constraint("uq_update_device", type_="unique")
        b.create_unique_constraint("uq_update_rollout_device", ["rollout_id", "device_id"])
        b.create_index("ix_device_updates_rollout_id", ["rollout_id"])
        b.add_column(sa.Column("wave", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("sent_at", TZ, nullable=True))
        b.add_column(sa.Column("installed_at", TZ, nullable=True))
        b.add_column(sa.Column("before", sa.JSON(), nullable=False, server_default="{}"))
        b.add_column(sa.Column("beats_after", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("device_updates") as b:
        for name in ("beats_after", "before", "installed_at", "sent_at", "wave"):
            b.drop_column(name)
        b.drop_index("ix_device_updates_rollout_id")
        b.drop_constraint("uq_update_rollout_device", type_="unique")
        b.create_unique_constraint("uq_update_device", ["device_id", "target_version"])
    with op.batch_alter_table("rollouts") as b:
        b.drop_index("ix_rollouts_fleet")
        for name in (
            "finished_at", "wave_started_at", "release", "mlflow_run_id", "reason", "health",
            "params", "plan", "wave", "trigger", "mlflow_version", "target_version",
        ):  # fmt: skip
            b.drop_column(name)
    with op.batch_alter_table("devices") as b:
        for name in ("capabilities", "agent_version", "tags", "site"):
            b.drop_column(name)
    op.drop_table("fleets")
