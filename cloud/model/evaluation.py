"""Measuring a package the way a device runs it: golden-set accuracy, macro-F1 and recall,
batch-1 latency at the profile's threads, and the peak memory of a process running it.

ONNX Runtime and numpy only, as on a device: nothing here imports torch."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cloud.model.metrics import classification_metrics
from shared.package import ModelPackage


@dataclass
class ArtifactMetrics:
    """What one package does on the golden set, measured the way a device runs it."""

    package_bytes: int
    accuracy: float
    macro_f1: float
    recall: dict[str, float]
    latency_p50_ms: float
    latency_p99_ms: float
    threads: int
    peak_rss_mb: float | None = None  # of a process that only loads ORT and runs it

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "recall"}


def ort_session(graph: bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])


def latency_ms(run: Callable[[np.ndarray], Any], x: np.ndarray, n: int) -> tuple[float, float]:
    """p50 and p99 of one batch-1 call over ``n`` windows, after a warm-up."""
    windows = x[np.arange(n) % len(x)][:, None]  # (n, 1, T, C)
    for w in windows[:20]:
        run(w)
    times = np.empty(n)
    for i, w in enumerate(windows):
        t0 = time.perf_counter()
        run(w)
        times[i] = time.perf_counter() - t0
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


_MEMORY_PROBE = """
import sys, numpy as np, onnxruntime as ort
graph = open(sys.argv[1], "rb").read()
opts = ort.SessionOptions(); opts.intra_op_num_threads = int(sys.argv[2])
s = ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[3], allow_pickle=False)
for w in x: s.run(None, {s.get_inputs()[0].name: w[None]})
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) / 1024)
"""


def peak_memory_mb(graph: bytes, x: np.ndarray, threads: int) -> float | None:
    """Peak RSS of a fresh process that imports ORT, loads ``graph`` and runs windows: what
    inference costs a device, without this (torch-sized) process in the figure."""
    if not Path("/proc/self/status").exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        g, w = Path(tmp) / "model.onnx", Path(tmp) / "x.npy"
        g.write_bytes(graph)
        np.save(w, x[:32])
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, str(g), str(threads), str(w)],
            capture_output=True,
            text=True,
            check=True,
        )
    return float(out.stdout.strip().splitlines()[-1])


def evaluate_package(
    package: bytes,
    x: np.ndarray,
    y: np.ndarray,
    *,
    threads: int,
    latency_windows: int = 300,
    memory: bool = False,
) -> ArtifactMetrics:
    """Open ``package`` as a device would (every check of shared.package), then measure."""
    pkg = ModelPackage(package)
    sess = ort_session(pkg.graph, threads)
    name = sess.get_inputs()[0].name
    ev = classification_metrics(y, ort_predict(sess, x), list(pkg.manifest.class_names))
    p50, p99 = latency_ms(lambda w: sess.run(None, {name: w}), x, latency_windows)
    return ArtifactMetrics(
        package_bytes=len(package),
        accuracy=ev.accuracy,
        macro_f1=ev.macro_f1,
        recall=ev.recall,
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        threads=threads,
        peak_rss_mb=peak_memory_mb(pkg.graph, x, threads) if memory else None,
    )


def ort_predict(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """Class indices the open session ``sess`` gives ``x``, 256 windows a call."""
    name = sess.get_inputs()[0].name
    if len(x) == 0:
        return np.empty(0, dtype=np.int64)
    logits = np.concatenate(
        [sess.run(["logits"], {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)]
    )
    return logits.argmax(1)


def package_predict(package: bytes, x: np.ndarray, *, threads: int = 1) -> np.ndarray:
    """Class indices (into the manifest's class names) that ``package`` gives ``x``, opened
    and run as a device would."""
    return ort_predict(ort_session(ModelPackage(package).graph, threads), x)
