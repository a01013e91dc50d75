"""docker-compose.yml as a new operator would run it, checked without a Docker engine: it is
what deploy/stack.toml generates, Debian's docker-compose accepts it, every file it mounts
exists or is made by scripts/certs, every secret it reads is in .env.example, each image's
Dockerfile installs what scripts/check-images import-checks, and the cloud's settings in it
pass production mode's refusals."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    """A script of scripts/ (no .py suffix) as a module."""
    loader = importlib.machinery.SourceFileLoader(f"script_{name}", str(ROOT / "scripts" / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


stack = _script("stack")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "certs"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


def test_compose_and_env_example_are_generated_from_the_stack():
    for cmd in (["compose", "--check"], ["env-example", "--check"]):
        done = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "stack"), *cmd], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr


def test_docker_compose_accepts_it(tmp_path):
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is missing: `scripts/install dev` installs Debian's package"
    done = subprocess.run(
        [exe, "--env-file", ".env.example", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    # Without the secrets it refuses to start, naming what to set.
    (tmp_path / "empty.env").write_text("")
    bare = subprocess.run(
        [exe, "--env-file", str(tmp_path / "empty.env"), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
    )
    assert bare.returncode != 0 and "set in .env" in bare.stderr


def test_every_mounted_file_exists_or_scripts_certs_makes_it(compose, certs):
    mounted = []
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                mounted.append((name, source))
    assert mounted
    for service, source in mounted:
        if source.startswith("./deploy/certs"):
            made = certs / source.removeprefix("./deploy/certs").lstrip("/")
            assert made.exists(), f"{service} mounts {source}, which scripts/certs does not make"
        else:
            assert (ROOT / source).exists(), f"{service} mounts {source}, which does not exist"
    # Files a container runs from its mount are executable.
    for script in ("deploy/mosquitto/start", "deploy/mosquitto/healthcheck"):
        assert os.access(ROOT / script, os.X_OK), script


def test_every_secret_it_reads_is_named_in_env_example(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    read = set(re.findall(r"\$\{(\w+)", text))
    example = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert read == example, (sorted(read - example), sorted(example - read))
    assert example == set(stack.load()["secrets"])


def test_dockerfiles_install_what_check_images_checks():
    images = _script("check-images").IMAGES
    for name, spec in images.items():
        dockerfile = (ROOT / spec["dockerfile"]).read_text()
        runs = " ".join(line for line in dockerfile.splitlines() if "pip install" in line)
        for args in spec["pip"]:
            wanted = " ".join(a.replace("deploy/mlflow/", "/tmp/") for a in args)
            assert wanted in runs, (name, args)
        if spec["project"]:
            assert f'"{spec["project"]}"' in dockerfile, (name, spec["project"])


def test_the_clouds_compose_settings_pass_production_mode(certs, monkeypatch):
    """Each cloud service's environment, with real secrets and the certificates scripts/certs
    makes, is accepted by production mode: no setting compose gives is missing or unsafe."""
    from cloud.config import CloudSettings

    data = stack.load()
    secrets = {name: f"s3cret-{name.lower()}-0123456789" for name in data["secrets"]}
    for name, spec in data["cloud"].items():
        if not spec["roles"]:
            continue
        env = stack.env_of(spec["roles"], data, native=False)
        resolved = {
            k: re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: secrets[m.group(1)], v).replace(
                "/certs/", f"{certs}/"
            )
            for k, v in env.items()
        }
        for key in [k for k in os.environ if k.startswith("EDGELOOP_")]:
            monkeypatch.delenv(key)
        for key, value in resolved.items():
            monkeypatch.setenv(key, value)
        settings = CloudSettings(_env_file=None)
        assert settings.mode == "production", name
        assert settings.mqtt_username, name


def test_secrets_are_ignored_by_git_and_written_private(tmp_path, certs):
    """.env never enters the repository; `stack secrets` keeps scripts/certs' passwords
    (the broker's first state holds them), replaces placeholders and makes the file 0600
    even when it existed readable by all."""
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert ignored.returncode == 0, ".env must be in .gitignore"
    out = tmp_path / ".env"
    out.write_text((ROOT / ".env.example").read_text())
    out.chmod(0o644)
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "stack"), "secrets", "--out", str(out),
         "--certs", str(certs)], capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    written = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert set(written) == set(stack.load()["secrets"])
    assert "changeme" not in written.values() and len(set(written.values())) == len(written)
    made = dict(
        line.split("=", 1)
        for name in ("broker.env", "services.env")
        for line in (certs / name).read_text().splitlines()
    )
    assert all(written[k] == v for k, v in made.items() if k in written)


def test_no_service_but_the_broker_mounts_its_key_or_another_services(compose):
    """Each TLS service mounts its own certificate and key, never the certificates folder
    (the CA's key, every service's passwords); only the broker sees the broker's key."""
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert source.rstrip("/") != "./deploy/certs", (name, volume)
            if source.startswith("./deploy/certs/"):
                file = source.removeprefix("./deploy/certs/")
                assert file not in ("ca.key", "broker.env", "services.env"), (name, volume)
                if file.endswith(".key"):
                    assert file == ("server.key" if name == "mosquitto" else f"{name}.key")


def test_an_edge_service_starts_from_its_enrollment(compose, certs, tmp_path, monkeypatch):
    """An edge container's settings, with the mqtt.env `fleet enroll` writes sourced in its
    enrollment folder as its entrypoint does, pass the edge's production checks."""
    from edge_agent.config import EdgeSettings

    svc = compose["services"]["edge-plant-01"]
    folder = tmp_path / "plant-01"
    folder.mkdir()
    shutil.copy(certs / "ca.crt", folder / "broker-ca.crt")
    enrolled = {
        "EDGELOOP_EDGE_FLEET": "plant-a",
        "EDGELOOP_EDGE_DEVICE_ID": "plant-01",
        "EDGELOOP_EDGE_MQTT_USERNAME": "plant-a/plant-01",
        "EDGELOOP_EDGE_MQTT_PASSWORD": "a-random-password-from-enroll",
        "EDGELOOP_EDGE_MQTT_CA_FILE": "broker-ca.crt",  # relative, as enroll writes it
    }
    assert "cd /enroll/plant-01 &&" in svc["entrypoint"][-1]
    for key in [k for k in os.environ if k.startswith("EDGELOOP_EDGE_")]:
        monkeypatch.delenv(key)
    for key, value in {**svc["environment"], **enrolled}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("EDGELOOP_EDGE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(folder)
    settings = EdgeSettings(_env_file=None)
    assert settings.mode == "production" and settings.mqtt_tls
