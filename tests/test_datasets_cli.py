"""`edgeloop cloud register-dataset` on the real S3 store: a set is registered under its
name and read back as rounds read it; one that shares windows with another is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from cloud.store.datasets import load_dataset

from .conftest import S3_KEY, S3_PORT, S3_SECRET


def test_register_reads_back_and_refuses_shared_windows(s3_store, tep_small, tmp_path):
    train, golden = tep_small
    env = {**os.environ, "EDGELOOP_STORE": "s3", "EDGELOOP_S3_ENDPOINT": f"127.0.0.1:{S3_PORT}",
           "EDGELOOP_S3_ACCESS_KEY": S3_KEY, "EDGELOOP_S3_SECRET_KEY": S3_SECRET,
           "EDGELOOP_S3_BUCKET": s3_store.bucket}  # fmt: skip
    names = np.array(train.class_names)
    np.savez(tmp_path / "base.npz", x=train.x, y=train.y, class_names=names)
    np.savez(tmp_path / "golden.npz", x=golden.x, y=golden.y, class_names=names)
    # A "golden" set that repeats two training windows.
    leaky_x, leaky_y = (
        np.concatenate([golden.x, train.x[:2]]),
        np.concatenate([golden.y, train.y[:2]]),
    )
    np.savez(tmp_path / "leaky.npz", x=leaky_x, y=leaky_y, class_names=names)

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-c", "from shared.cli import main; main()", "cloud",
             "register-dataset", *args],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    base = cli("base", str(tmp_path / "base.npz"))
    leaky = cli("golden", str(tmp_path / "leaky.npz"))
    good = cli("golden", str(tmp_path / "golden.npz"))

    assert base.returncode == 0, base.stderr
    assert f"registered 'base': {len(train.x)} windows" in base.stdout
    assert leaky.returncode == 2 and "shares 2 window(s) with the registered 'base'" in leaky.stderr
    assert good.returncode == 0, good.stderr
    back = load_dataset(store=s3_store, name="golden")
    assert np.array_equal(back.x, golden.x)
    assert back.labels.tolist() == names[golden.y].tolist()
