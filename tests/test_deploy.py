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
    assert read and read <= example, sorted(read - example)
    assert example == set(stack.load()["secrets"])


def test_dockerfiles_install_what_check_images_checks():
    images = _script("check-images").IMAGES
    for name, spec in images.items():
        dockerfile = (ROOT / spec["dockerfile"]).read_text()
        runs = " ".join(line for line in dockerfile.splitlines() if "pip install" in line)
        for args in spec["pip"]:
            wanted = " ".join(a.replace("deploy/mlflow/", "/tmp/") for a in args)
            assert wanted in runs or args[-1] in dockerfile, (name, args)
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
