"""`edgeloop fleet enroll` and the fleet's class allow-list: a device of an initialised fleet
gets the fleet's TUF root; an unknown fleet or profile is refused; ingest refuses a device
label outside the allow-list."""

from __future__ import annotations

import json

import pytest
import typer
from sqlalchemy import select
from typer.testing import CliRunner

from cloud.commands.fleet import classes_cmd, enroll_cmd
from cloud.config import get_settings
from cloud.ingest.ingestor import Ingestor
from cloud.rollout.signing import init_fleet_trust
from cloud.store.db import DeadLetter, Device, Label, ModelVersion, session_factory
from cloud.store.records import create_fleet, register_device
from shared.messages import LabelMessage
from shared.package import model_name
from shared.topics import topic

from .conftest import sample_message, use_cloud, windows_of


@pytest.fixture
def edgeloop(monkeypatch, pg_url, s3_store):
    """`edgeloop fleet …` in this process, on this test's database and bucket."""
    use_cloud(monkeypatch, pg_url, s3_store)
    app = typer.Typer()
    app.command("enroll")(enroll_cmd)
    app.command("classes")(classes_cmd)

    def run(*args: str) -> tuple[int, str]:
        out = CliRunner().invoke(app, list(args))
        return out.exit_code, out.output

    yield run
    get_settings.cache_clear()


@pytest.fixture
def initialised(pg_url, s3_store, fleet, tmp_path):
    """A fleet as `cloud init` leaves it: its row, its TUF root, a promoted cpu-fp32 v1."""
    sessions = session_factory(pg_url)
    with sessions() as s:
        create_fleet(session=s, fleet=fleet, classes=["normal", "idv_01"])
        s.add(
            ModelVersion(
                name=model_name(fleet, "cpu-fp32"), version="v1", mlflow_version="1",
                profile="cpu-fp32", sha256="0" * 64, parent=None,
                object_key=f"packages/{fleet}/cpu-fp32/v1.edgepkg",
                class_names=["normal", "idv_01"], gates={"passed": True},
            )
        )  # fmt: skip
        s.commit()
    root = init_fleet_trust(
        store=s3_store, fleet=fleet, keys_dir=tmp_path / "online", offline_dir=tmp_path / "off"
    )
    return sessions, root


def test_enroll_writes_the_fleets_root_and_registers_site_and_tags(
    edgeloop, initialised, fleet, tmp_path
):
    """The device row carries profile, site and tags; root.json is the fleet's root, byte for
    byte, beside device.json. Enrolling again updates the row."""
    sessions, root = initialised
    out = tmp_path / "enroll-d1"

    rc, said = edgeloop(
        "enroll", "d1", "--fleet", fleet, "--profile", "cpu-fp32", "--site", "plant-a",
        "--tag", "line=3", "--tag", "ring=canary", "--out", str(out),
    )  # fmt: skip
    rc_again, _ = edgeloop(
        "enroll", "d1", "--fleet", fleet, "--profile", "cpu-fp32", "--site", "plant-b",
        "--out", str(out),
    )  # fmt: skip

    assert rc == 0, said
    assert "edgeloop edge enroll --root" in said
    assert (out / "root.json").read_bytes() == root
    identity = json.loads((out / "device.json").read_text())
    assert identity == {
        "fleet": fleet, "device_id": "d1", "profile": "cpu-fp32", "site": "plant-b", "tags": {},
    }  # fmt: skip
    assert rc_again == 0
    with sessions() as s:
        device = s.get(Device, "d1")
    assert (device.fleet, device.profile, device.site, device.tags) == (
        fleet, "cpu-fp32", "plant-b", {}
    )  # fmt: skip


def test_enroll_refuses_an_unknown_fleet_or_profile(edgeloop, initialised, fleet, tmp_path):
    """No fleet row, or no promoted model for the profile: refused with what to run, and
    nothing registered or written."""
    sessions, _ = initialised
    out = tmp_path / "enroll"

    rc_fleet, no_fleet = edgeloop(
        "enroll", "d9", "--fleet", f"{fleet}x", "--profile", "cpu-fp32", "--out", str(out)
    )
    rc_profile, no_profile = edgeloop(
        "enroll", "d9", "--fleet", fleet, "--profile", "rpi4-int8", "--out", str(out)
    )
    rc_tag, bad_tag = edgeloop(
        "enroll", "d9", "--fleet", fleet, "--profile", "cpu-fp32", "--tag", "oops",
        "--out", str(out),
    )  # fmt: skip

    assert rc_fleet == 2 and "does not exist" in no_fleet and "cloud init" in no_fleet
    assert rc_profile == 2 and "no promoted model for profile 'rpi4-int8'" in no_profile
    assert "edgeloop cloud init" in no_profile
    assert rc_tag == 2 and "KEY=VALUE" in bad_tag
    assert not out.exists()
    with sessions() as s:
        assert s.get(Device, "d9") is None


def test_ingest_refuses_labels_outside_the_allow_list(
    edgeloop, initialised, s3_store, fleet, tep_small
):
    """A device label of a class not on the fleet's list is dead-lettered as
    label_not_allowed and stored nowhere; once an operator adds the class, it is stored."""
    sessions, _ = initialised
    with sessions() as s:
        register_device(session=s, device_id="d1", fleet=fleet, profile="cpu-fp32")
    ingestor = Ingestor(sessions=sessions, store=s3_store)
    train, _ = tep_small
    sample = sample_message(fleet, windows_of(train, "idv_02", 1)[0])
    assert ingestor.handle(topic(fleet, "d1", "samples"), sample.encode()).status == "stored"

    def label(name):
        msg = LabelMessage(fleet=fleet, device_id="d1", sample_ids=(sample.message_id,),
                           label=name)  # fmt: skip
        ack = ingestor.handle(topic(fleet, "d1", "labels"), msg.encode())
        return ack.status, ack.reason

    refused = label("idv_02")
    rc_odd, odd = edgeloop("classes", "--fleet", fleet, "--add", "idv\u202e20")
    assert rc_odd != 0 and "RIGHT-TO-LEFT OVERRIDE" in odd, odd
    rc, added = edgeloop("classes", "--fleet", fleet, "--add", "idv_02")
    accepted = label("idv_02")
    rc_list, listed = edgeloop("classes", "--fleet", fleet)

    assert refused == ("rejected", "label_not_allowed")
    assert rc == 0 and rc_list == 0 and "normal, idv_01, idv_02" in listed, (added, listed)
    assert accepted == ("stored", None)
    with sessions() as s:
        letters = s.scalars(select(DeadLetter).where(DeadLetter.fleet == fleet)).all()
        labels = s.scalars(select(Label.label)).all()
    assert [d.reason for d in letters] == ["label_not_allowed"]
    assert "idv_02" in letters[0].detail and labels == ["idv_02"]
    assert s3_store.exists(letters[0].payload_key)  # the raw message kept beside its reason


def test_an_operator_label_outside_the_allow_list_says_how_to_extend_it(
    initialised, s3_store, fleet, tep_small
):
    """`edgeloop cloud label` with a class the fleet does not list (a typo, or a new fault)
    is refused with the command that adds it; nothing is stored; once added, it is."""
    from cloud.rollout.fleet import label_samples
    from cloud.store.records import allow_classes
    from shared.errors import DataError

    sessions, _ = initialised
    with sessions() as s:
        register_device(session=s, device_id="d1", fleet=fleet, profile="cpu-fp32")
    train, _ = tep_small
    sample = sample_message(fleet, windows_of(train, "idv_02", 1)[0])
    Ingestor(sessions=sessions, store=s3_store).handle(
        topic(fleet, "d1", "samples"), sample.encode()
    )
    ids = [str(sample.message_id)]

    with sessions() as s, pytest.raises(DataError) as err:
        label_samples(session=s, sample_ids=ids, label="idv_2")
    with sessions() as s:
        allow_classes(session=s, fleet=fleet, add=["idv_02"])
        labelled = label_samples(session=s, sample_ids=ids, label="idv_02")
        labels = s.scalars(select(Label.label)).all()

    assert err.value.reason == "label_not_allowed"
    assert f"edgeloop fleet classes --fleet {fleet} --add idv_2" in str(err.value)
    assert labelled == 1 and labels == ["idv_02"]
