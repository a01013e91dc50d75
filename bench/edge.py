"""Edge agent overhead: the whole agent (score, select, encode, buffer durably) against
bare ONNX Runtime inference of the same package, in one run; and the agent's memory.

    python bench/edge.py [--quick] [--seed N]

The parent process (cloud side) simulates a plant stream with tep-studio, trains and
packages the default model (torch seeded with --seed, default 0, so the accuracy-side
figures repeat); a child process that imports only the edge agent measures two things.

Detect path (``overhead_ratio``, wall time, as before): ORT ``session.run`` on one window,
batch 1, 1 thread, against ``EdgeAgent.process`` on the same windows, timed in
alternating blocks of 50. The agent's writer thread (message encoding, the SQLite commit)
runs beside it and its cost falls outside both blocks.

Whole process (``process_cpu_ratio``): the process's CPU time (``time.process_time``: all
threads, user and system) over whole passes, bare passes and agent passes alternating;
an agent pass ends with ``sync()``, so every window it selected is encoded and committed
to the SQLite buffer before the clock stops. A pass replays the stream several times with
the selector's memory cleared before each replay, so each replay uploads what a fresh
stream would. This is the figure the ≤ 1.5x goal applies to, at two upload shares:

* the bench's stream: a plant's day of 3 (quick) or 6 (full) normal episodes plus one
  episode of a known fault (idv_01) and one of a fault the model never saw (idv_06), 5 h
  each; the faults are 31% (quick) or 18% (full) of the windows and all are uploaded.
* a realistic stream (``realistic``): the same normal episodes with the fault episodes cut
  to their first windows, so that faults are 5% of the windows. A plant runs in normal
  operation nearly all the time: the ASM Consortium's often-quoted estimate puts what
  abnormal situations cost at 3-8% of a plant's capacity, so 5% of the time in a fault is
  the middle of that range. The upload share this gives is measured, not set, and it is
  not "a few %": the seed-0 model's feature distance calls 11-12% of these normal windows
  out of distribution (10 of 90 quick, 22 of 180 full), and each is uploaded, so the
  realistic share comes out at 16%. Lower false alarms would lower it and the agent's
  cost with it.

Link offline in both (no network in the figures). The writer thread idles during the bare
passes (one wake-up per 50 ms, charged to bare: negligible). The CPU time of both sides
grows on a loaded machine; ``load_avg_1min`` (before, after) says how loaded it was.
Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REALISTIC_FAULT_SHARE = 0.05


def _agent(package: Path, state: Path):
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import EdgeSettings

    agent = EdgeAgent(
        EdgeSettings(fleet="bench", device_id="d1", mqtt_port=9, state_dir=state, threads=1)
    )
    agent.bootstrap(package.read_bytes())
    return agent


def detect_path(agent, stream, repeats: int) -> dict:
    """The detect path against bare ORT, wall time, alternating blocks of 50 windows."""
    runtime = agent.runtime
    sess, name = runtime.session, runtime.input_name
    bare = agent_t = 0.0
    selected = 0
    block = 50
    for _ in range(repeats):
        # Each pass meets the stream as new: without this the diversity rule would skip the
        # replayed windows and later passes would upload nothing, flattering the agent.
        agent.selector.forget()
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
    return {
        "windows": n,
        "bare_ms": 1e3 * bare / n,
        "agent_ms": 1e3 * agent_t / n,
        "overhead_ratio": agent_t / bare,
        "selected": selected,
    }


def whole_process(agent, stream, passes: int, replays: int) -> dict:
    """The process's CPU time (all threads) per window over whole passes, bare and agent
    alternating; an agent pass ends with the writer flushed (``sync()``)."""
    runtime = agent.runtime
    sess, name = runtime.session, runtime.input_name
    bare = whole = 0.0
    selected = 0
    ratios = []
    agent.sync()
    for _ in range(passes):
        t0 = time.process_time()
        for _ in range(replays):
            for w in stream:
                sess.run(None, {name: w[None]})
        b = time.process_time() - t0
        t0 = time.process_time()
        for _ in range(replays):
            agent.selector.forget()  # each replay uploads what a fresh stream would
            for w in stream:
                selected += agent.process(w)[1] is not None
        agent.sync()  # every selected window encoded and committed before the clock stops
        a = time.process_time() - t0
        bare, whole = bare + b, whole + a
        ratios.append(a / b)
    n = len(stream) * replays * passes
    ratios.sort()
    return {
        "windows": n,
        "bare_cpu_ms": 1e3 * bare / n,
        "agent_cpu_ms": 1e3 * whole / n,
        "process_cpu_ratio": whole / bare,
        "pass_ratio_median": ratios[len(ratios) // 2],
        "pass_ratio_max": ratios[-1],
        "upload_share": selected / n,
        "selected": selected,
    }


def durable(agent) -> int:
    """Messages in the buffer or evicted from it: every selected one, after sync()."""
    agent.sync()
    return agent.buffer.depth() + agent.buffer.stats().get("evicted", 0)


def child(package: Path, streams: Path, state: Path, repeats: int, passes: int) -> dict:
    import numpy as np

    data = np.load(streams, allow_pickle=False)  # data only, never code
    stream, realistic = data["stream"], data["realistic"]
    replays = max(1, -(-1000 // len(stream)))  # a pass of at least 1,000 windows
    load_before = os.getloadavg()
    agent = _agent(package, state / "bench")
    runtime = agent.runtime
    assert runtime is not None
    for w in stream[:50]:  # warm-up, both paths
        runtime.session.run(None, {runtime.input_name: w[None]})
        agent.process(w)
    agent.selector.forget()
    warm = durable(agent)
    out = detect_path(agent, stream, repeats)
    candidates = sum(bool(agent.selector.reasons(runtime.detect(w[None])[0])) for w in stream)
    whole = whole_process(agent, stream, passes, replays)
    out["durable"] = durable(agent) - warm  # every selected window is in the buffer
    out["selected"] += whole["selected"]
    out["process"] = whole
    out["process_cpu_ratio"] = whole["process_cpu_ratio"]
    out["upload_share"] = whole["upload_share"]
    # Memory of one running agent, read before the second one (realistic stream) is made.
    # VmHWM, not ru_maxrss: the latter inherits the parent's (torch-sized) peak at fork.
    with open("/proc/self/status") as fh:
        status = dict(line.split(":", 1) for line in fh)
    agent.stop()

    agent = _agent(package, state / "realistic")
    for w in realistic[:50]:
        agent.process(w)
    agent.selector.forget()
    warm = durable(agent)
    real = whole_process(agent, realistic, passes, max(1, -(-1000 // len(realistic))))
    real["durable"] = durable(agent) - warm
    real["fault_share"] = float(data["realistic_fault_share"])
    out["realistic"] = real
    agent.stop()
    heavy = [
        m for m in ("torch", "transformers", "mlflow", "celery", "sqlalchemy") if m in sys.modules
    ]
    out.update(
        {
            "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
            "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024,
            "candidate_share": candidates / len(stream),  # uncertain, faulty or OOD
            "selected_share": out["selected"] / (out["windows"] + whole["windows"]),
            "heavy_modules_loaded": heavy,
            "load_avg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        }
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a shorter stream (≈1 min)")
    parser.add_argument("--seed", type=int, default=0, help="torch's seed for the model")
    parser.add_argument(
        "--child", nargs=3, metavar=("PACKAGE", "STREAMS", "STATE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--repeats", type=int, default=None, help="detect-path passes")
    parser.add_argument("--passes", type=int, default=None, help="whole-process passes")
    args = parser.parse_args()
    if args.child:
        package, streams, state = (Path(p) for p in args.child)
        print(json.dumps(child(package, streams, state, repeats=args.repeats, passes=args.passes)))
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

    torch.manual_seed(args.seed)  # the CNN's initial weights: the selection figures repeat
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
    # A plant's day: mostly normal operation, with one episode of a known fault and one of
    # a fault the model never saw.
    sim = FleetSimulator(
        devices=1, initial_faults=classes, new_faults=["idv_06"], horizon_h=5.0, cache_dir=cache
    )
    normal_eps = [Episode("normal", 500 + i, 5.0) for i in range(3 if args.quick else 6)]
    fault_eps = [Episode("idv_01", 600, 5.0), Episode("idv_06", 601, 5.0)]
    print(f"simulating {len(normal_eps) + 2} episodes of the plant's day …", file=sys.stderr)
    normal = np.concatenate([sim.windows(e) for e in normal_eps])
    faults = [sim.windows(e) for e in fault_eps]
    stream = np.concatenate([normal, *faults])
    # The realistic stream: the same normal operation, each fault cut to its first windows
    # so that faults are REALISTIC_FAULT_SHARE of all windows (see the docstring).
    n_fault = round(len(normal) * REALISTIC_FAULT_SHARE / (1 - REALISTIC_FAULT_SHARE))
    cuts = [f[: n_fault // 2 + (i < n_fault % 2)] for i, f in enumerate(faults)]
    realistic = np.concatenate([normal, *cuts])
    with tempfile.TemporaryDirectory() as tmp:
        pkg, win = Path(tmp) / "v1.edgepkg", Path(tmp) / "streams.npz"
        pkg.write_bytes(package)
        np.savez(
            win,
            stream=stream,
            realistic=realistic,
            realistic_fault_share=np.float64(sum(map(len, cuts)) / len(realistic)),
        )
        repeats = args.repeats or (10 if args.quick else 20)  # short runs are noisy
        passes = args.passes or (20 if args.quick else 80)  # noisy on a shared machine
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
                "--passes",
                str(passes),
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            sys.exit(f"the edge child failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    whole = [result["process_cpu_ratio"], result["realistic"]["process_cpu_ratio"]]
    result.update(
        {
            "seed": args.seed,
            "package_bytes": len(package),
            "goal_overhead_ratio": 1.5,  # the whole process's, at both upload shares
            "goal_rss_mb": 150,
            "all_durable": result["durable"] == result["selected"]
            and result["realistic"]["durable"] == result["realistic"]["selected"],
            "meets_goals": max(whole) <= 1.5
            and result["rss_mb"] <= 150
            and not result["heavy_modules_loaded"],
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
