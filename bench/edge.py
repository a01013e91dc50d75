"""Edge agent overhead: the whole agent path (score, select, buffer) against bare ONNX
Runtime inference of the same package, in one run; and the agent's resident memory.

    python bench/edge.py [--quick]

The parent process (cloud side) simulates a plant stream with tep-studio, trains and
packages the default model; a child process that imports only the edge agent measures:
  bare_ms   ORT session.run on one window, batch 1, 1 thread (mean over the stream)
  agent_ms  EdgeAgent.process on the same windows: ORT + all scores + selection + the
            durable SQLite write of every selected window (link offline, so no network)
The two are timed in alternating blocks so that machine noise hits both alike.
Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(package: Path, windows: Path, state: Path, repeats: int) -> dict:
    import numpy as np

    from edge_agent.agent import EdgeAgent
    from edge_agent.config import EdgeSettings

    stream = np.load(windows, allow_pickle=False)  # data only, never code
    agent = EdgeAgent(
        EdgeSettings(fleet="bench", device_id="d1", mqtt_port=9, state_dir=state, threads=1)
    )
    agent.bootstrap(package.read_bytes())
    runtime = agent.runtime
    assert runtime is not None
    sess, name = runtime.session, runtime.input_name
    for w in stream[:50]:  # warm-up, both paths
        sess.run(None, {name: w[None]})
    bare = agent_t = 0.0
    selected = 0
    block = 50
    for _ in range(repeats):
        # Each pass meets the stream as new: without this the diversity rule would skip the
        # replayed windows and later passes would upload nothing, flattering the agent.
        agent.selector.recent.clear()
        agent.selector.tokens = agent.selector.capacity
        for start in range(0, len(stream), block):
            part = stream[start : start + block]
            t0 = time.perf_counter()
            for w in part:
                sess.run(None, {name: w[None]})
            bare += time.perf_counter() - t0
            t0 = time.perf_counter()
            for w in part:
                selected += agent.process(w)[1] is not None
            agent_t += time.perf_counter() - t0
    n = len(stream) * repeats
    candidates = sum(bool(agent.selector.reasons(runtime.detect(w[None])[0])) for w in stream)
    agent.sync()
    durable = agent.buffer.depth() + agent.buffer.stats().get("evicted", 0)
    # VmHWM, not ru_maxrss: the latter inherits the parent's (torch-sized) peak at fork.
    with open("/proc/self/status") as fh:
        status = dict(line.split(":", 1) for line in fh)
    rss_kb = int(status["VmRSS"].split()[0])
    peak_kb = int(status["VmHWM"].split()[0])
    heavy = [
        m for m in ("torch", "transformers", "mlflow", "celery", "sqlalchemy") if m in sys.modules
    ]
    return {
        "windows": n,
        "bare_ms": 1e3 * bare / n,
        "agent_ms": 1e3 * agent_t / n,
        "overhead_ratio": agent_t / bare,
        "rss_mb": rss_kb / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "candidate_share": candidates / len(stream),  # uncertain, faulty or out of distribution
        "selected_share": selected / n,  # after the diversity rule and the byte budget
        "selected": selected,
        "durable": durable,  # every selected window is in the buffer after sync()
        "heavy_modules_loaded": heavy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a shorter stream (≈1 min)")
    parser.add_argument(
        "--child", nargs=3, metavar=("PACKAGE", "WINDOWS", "STATE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    if args.child:
        out = child(*(Path(p) for p in args.child), repeats=args.repeats)
        print(json.dumps(out))
        return

    import numpy as np
    import torch

    from cloud.model.cnn import ModelConfig, build_model
    from cloud.model.configs import TrainConfig
    from cloud.model.export import package_model
    from cloud.model.ood import ood_calibration
    from cloud.model.train import train
    from sim.fleet import Episode, FleetSimulator
    from sim.tep import generate

    torch.set_num_threads(1)  # multi-threaded CPU training is not bit-reproducible
    cache = ROOT / ".edgeloop" / "bench-cache"
    classes = ["normal", "idv_01", "idv_02", "idv_07"]
    print("simulating the plant and training the default model …", file=sys.stderr)
    data = generate(
        classes=classes, runs_per_class=2, seed=0, horizon_h=5.0, cache_dir=cache, workers=2
    )
    model = build_model(ModelConfig(n_classes=len(classes)), data.x[data.y == 0])
    train(model, data.x, data.y, TrainConfig(epochs=20))
    package = package_model(
        model,
        name="edgeloop.bench.cpu-fp32",
        version="v1",
        parent=None,
        profile="cpu-fp32",
        class_names=classes,
        ood=ood_calibration(data.x[data.y == 0]),
    )
    # A plant's day: mostly normal operation (3/4 of the episodes), with one episode of a
    # known fault and one of a fault the model never saw.
    sim = FleetSimulator(
        devices=1, initial_faults=classes, new_faults=["idv_06"], horizon_h=5.0, cache_dir=cache
    )
    episodes = [Episode("normal", 500 + i, 5.0) for i in range(3 if args.quick else 6)]
    episodes += [Episode("idv_01", 600, 5.0), Episode("idv_06", 601, 5.0)]
    print(f"simulating {len(episodes)} episodes of the plant's day …", file=sys.stderr)
    stream = np.concatenate([sim.windows(e) for e in episodes])
    with tempfile.TemporaryDirectory() as tmp:
        pkg, win = Path(tmp) / "v1.edgepkg", Path(tmp) / "stream.npy"
        pkg.write_bytes(package)
        np.save(win, stream)
        repeats = args.repeats or (10 if args.quick else 20)  # short runs are noisy
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(pkg),
                str(win),
                str(Path(tmp) / "state"),
                "--repeats",
                str(repeats),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(
        {
            "package_bytes": len(package),
            "goal_overhead_ratio": 1.5,
            "goal_rss_mb": 150,
            "meets_goals": result["overhead_ratio"] <= 1.5
            and result["rss_mb"] <= 150
            and not result["heavy_modules_loaded"],
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
