"""`edgeloop cloud init`: a fresh database and an empty registry to a fleet with its data
sets, class allow-list, TUF root and a promoted first model per profile, recorded as rounds."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from mlflow import MlflowClient
from sqlalchemy import select
from tuf.api.metadata import Metadata, Root

from cloud.learn.bootstrap import check_datasets
from cloud.rollout.signing import root_metadata
from cloud.rollout.webhook import WebhookServer
from cloud.store.datasets import LabelledWindows
from cloud.store.db import Fleet, ModelVersion, Round, session_factory
from cloud.store.keys import dataset_key
from cloud.tracking.webhooks import delete_webhook
from shared.errors import DataError
from shared.package import model_name
from sim.tep import generate

from .conftest import HOST, S3_KEY, S3_PORT, S3_SECRET, TEP_CACHE, wait_for

SECRET = "init-test-" + "0123456789abcdef"
PROFILES = ("cpu-fp32", "x86-fp32")  # two devices classes that run the teacher as it is

# The command as the lead registers it (`app.command("init")(init_fleet_cmd)`), run alone.
INIT = (
    "import typer; from cloud.commands.fleet import init_fleet_cmd; "
    "app = typer.Typer(); app.command()(init_fleet_cmd); app()"
)


def write_windows(path, windows):
    np.savez(path, x=windows.x, y=windows.y, class_names=np.array(windows.class_names))
    return path


@pytest.fixture
def windows_files(tmp_path, tep_small):
    """Base, validation and golden windows files of disjoint episodes."""
    train, golden = tep_small
    validation = generate(
        classes=train.class_names, runs_per_class=1, seed=41, horizon_h=4.0,
        cache_dir=TEP_CACHE, workers=2,
    )  # fmt: skip
    return {
        "base": write_windows(tmp_path / "base.npz", train),
        "validation": write_windows(tmp_path / "validation.npz", validation),
        "golden": write_windows(tmp_path / "golden.npz", golden),
    }


def init(env, fleet, files, offline):
    args = ["--fleet", fleet, "--offline-keys", str(offline)]
    for role, path in files.items():
        args += [f"--{role}", str(path)]
    for profile in PROFILES:
        args += ["--profile", profile]
    out = subprocess.run(
        [sys.executable, "-c", INIT, *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return out.returncode, out.stdout + out.stderr


@pytest.fixture
def receiver(fleet, mlflow_uri):
    """A webhook receiver recording this fleet's champion moves; its MLflow webhook (named
    for the test) is removed afterwards."""
    calls: list[tuple[str, str, str]] = []
    server = WebhookServer(
        secret=SECRET, on_alias=lambda *call: calls.append(call) if call[0] == fleet else None
    ).start()
    yield server, calls
    server.stop()
    delete_webhook(tracking_uri=mlflow_uri, name=f"edgeloop-test-{fleet}")


def test_init_brings_a_fresh_fleet_to_a_promoted_first_model(
    pg_url, s3_store, mlflow_uri, fleet, windows_files, tep_small, tmp_path, receiver
):
    """Init registers the three sets, creates the fleet (allow-list: the base classes) and
    its TUF root (root and targets keys offline, the online ones in the keys dir), and runs
    round 0 per profile through the round stages: v1 promoted to champion in MLflow, a done
    `rounds` row, and the champion move delivered to the webhook receiver (what queues the
    rollout). Run again, it says what exists and does nothing."""
    server, calls = receiver
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_WEBHOOK_")}
    env.update(
        EDGELOOP_WEBHOOK_SECRET=SECRET,
        EDGELOOP_WEBHOOK_URL=server.url,
        EDGELOOP_WEBHOOK_NAME=f"edgeloop-test-{fleet}",
    )
    env.update(
        EDGELOOP_DATABASE_URL=pg_url,
        EDGELOOP_STORE="s3",
        EDGELOOP_S3_ENDPOINT=f"{HOST}:{S3_PORT}",
        EDGELOOP_S3_ACCESS_KEY=S3_KEY,
        EDGELOOP_S3_SECRET_KEY=S3_SECRET,
        EDGELOOP_S3_BUCKET=s3_store.bucket,
        EDGELOOP_MLFLOW_TRACKING_URI=mlflow_uri,
        EDGELOOP_TUF_KEYS_DIR=str(tmp_path / "online"),
        EDGELOOP_ROUND_EPOCHS="6",
        MLFLOW_LOGGING_LEVEL="WARNING",
    )
    offline = tmp_path / "offline"

    rc, said = init(env, fleet, windows_files, offline)
    rc_again, said_again = init(env, fleet, windows_files, offline)

    assert rc == 0, said
    assert f"MLflow tells {server.url}" in said
    wait_for(lambda: len(calls) == len(PROFILES), timeout=30, what="the champion deliveries")
    assert sorted(calls) == [(fleet, p, "1") for p in PROFILES]
    for step in ("[1/4] data sets", "[2/4] fleet", "[3/4] TUF root", "[4/4] first model"):
        assert step in said, said
    train, _ = tep_small
    sessions = session_factory(pg_url)
    with sessions() as s:
        row = s.get(Fleet, fleet)
        rounds = s.scalars(select(Round).where(Round.fleet == fleet)).all()
        versions = s.scalars(select(ModelVersion)).all()
    assert row.classes == train.class_names
    assert sorted((r.profile, r.version, r.reason, r.state) for r in rounds) == [
        (p, "v1", "initial", "done") for p in PROFILES
    ]
    for r in rounds:
        assert all(r.stages[stage]["done"] for stage in ("train", "recompress", "evaluate"))
        assert r.stages["register"]["output"]["promoted"]
    assert sorted((v.name, v.version) for v in versions) == [
        (model_name(fleet, p), "v1") for p in PROFILES
    ]
    client = MlflowClient(tracking_uri=mlflow_uri)
    for p in PROFILES:
        champion = client.get_model_version_by_alias(model_name(fleet, p), "champion")
        assert champion.version == "1" and champion.tags["gate_verdict"] == "pass"
    root = root_metadata(store=s3_store, fleet=fleet)
    assert isinstance(Metadata.from_bytes(root).signed, Root)
    assert row.settings["trust"]["root_sha256"] == hashlib.sha256(root).hexdigest()
    roles = {
        where: sorted(f.name.split("-")[0] for f in (path / fleet).glob("*.pem"))
        for where, path in (("offline", offline), ("online", tmp_path / "online"))
    }
    assert roles == {
        "offline": ["root", "targets"],
        "online": ["releases", "snapshot", "timestamp"],
    }
    for role in ("base", "validation", "golden"):
        assert s3_store.exists(dataset_key(role))

    assert rc_again == 0 and "nothing to do" in said_again, said_again
    assert "TUF root" in said_again and "cpu-fp32 v1" in said_again
    with sessions() as s:
        assert len(s.scalars(select(Round).where(Round.fleet == fleet)).all()) == 2


def test_init_refuses_sets_that_share_windows_or_replace_another(s3_store, tep_small):
    """A golden set that shares windows with the base set is refused before anything is
    registered; so is a different set under a name that is registered already."""
    train, golden = tep_small
    base = LabelledWindows(train.x, np.array(train.class_names)[train.y])
    gold = LabelledWindows(golden.x, np.array(golden.class_names)[golden.y])
    leaky = LabelledWindows(
        np.concatenate([gold.x, base.x[:3]]), np.concatenate([gold.labels, base.labels[:3]])
    )

    with pytest.raises(DataError, match="share 3 window"):
        check_datasets(store=s3_store, sets={"base": base, "golden": leaky})
    assert check_datasets(store=s3_store, sets={"base": base, "golden": gold}) == {
        "base": False,
        "golden": False,
    }
    from cloud.store.datasets import register_dataset

    register_dataset(store=s3_store, name="base", data=base)
    assert check_datasets(store=s3_store, sets={"base": base, "golden": gold})["base"]
    other = LabelledWindows(base.x[:-1], base.labels[:-1])
    with pytest.raises(DataError, match="another 'base' set is registered"):
        check_datasets(store=s3_store, sets={"base": other, "golden": gold})
