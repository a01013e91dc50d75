"""Compression: the edge package against the teacher and every baseline a skeptic would ask
for, on the same TEP episodes, same epochs, same machine, same run, over paired seeds.

    python bench/compression.py [--quick] [--profile rpi4-int8] [--backbones patchtst,deepseek]
                                [--seeds N]

Three disjoint sets of whole episodes (different simulator seeds): training, validation
(every choice: the teacher's depth and learning rate, compression's student setting, each
baseline's learning rate, ORT's quantization mode) and golden (reported only). Per seed
the training and validation episodes are drawn afresh from a pool, and the teacher, the
edge student's distillation, the direct model and the CNN all start from that seed.

Why the golden set is hard (the teacher scores below 100 macro-F1): random-variation
faults the controller half hides (idv_11 random reactor cooling water temperature, idv_17
random reactor heat transfer) and a valve stiction (idv_14) sit beside step faults, and
each class has only two training episodes (about 27 windows per fault episode) and one
validation episode. tep-studio offers no noise knob beyond its measurement-noise seed, so
the plants are not made noisier. (idv_10 and idv_16 were tried too and dropped: recall
0.1-0.6 for every model on two training episodes, which measures the data, not the method.)

Rows, each measured on the golden set under ONNX Runtime (batch 1, the profile's threads):
  teacher      the teacher chosen on validation among Plan.teacher_layers x Plan.lrs
               (not padded: a shallow teacher may win), FP32 package
  edge         our pipeline (block-influence layer pruning, FFN-channel pruning,
               distillation, per-layer quantization), student setting chosen on validation
  direct       the edge student's architecture (same blocks kept, same FFN widths) from a
               fresh init of the same seed, trained directly on the same windows for
               teacher + distillation epochs (learning rate chosen on validation), INT8 by
               the same quantizer and profile schemes: the same-size baseline
  cnn          the project's small CNN (cloud.model.cnn), trained the same way, FP32
  ort_teacher  ONNX Runtime quantization of the teacher's graph at its best: dynamic INT8
               per channel on MatMul and Gemm, as exported and with Gemm rewritten as
               MatMul + Add (ORT's dynamic mode has no Gemm kernel), and static QDQ INT8
               per channel with MinMax calibration on 256 training windows; the variant
               with the best validation macro-F1 is kept (named in "variant")
  ort_student  the same, applied to our FP32 distilled student (isolates what our
               per-layer scheme adds over ORT's)
  torch_ao     torch.ao dynamic INT8 (nn.Linear) of the teacher, run in torch, 1 thread;
               size is its saved state dict (DeepSeek's expert weights stay FP32)

Goals, each met only when the worst seed meets it: edge >= 8x smaller and >= 3x faster
(p50) than the teacher with golden macro-F1 at most 1 pt below it; and against `direct`
edge macro-F1 >= 1 pt higher, or a package no larger at equal or higher macro-F1.
Latency (p50, ms) is timed with every ONNX row taking turns (20 calls at a time, in a
fresh random order each round), so load from other jobs slows every row alike
("latency_ms_alone" keeps each package's own sequential timing); the JSON keeps the load
average. The profile's p99 latency budget is left out of the student choice here (on a
shared machine it measures the neighbours; the speedup goal reports latency instead).
When no student setting keeps macro-F1 within the profile's budget on validation,
compression refuses (BudgetError, kept in "budget_error"); the bench then measures the
profile's largest setting with that budget lifted, so the row still exists.

Time on a 2-core machine shared with four other jobs (load average 5-7): --quick about
16 min (PatchTST 13, DeepSeek 3); the full plan about 3 min per DeepSeek seed and 15 per
PatchTST seed.
Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import copy
import functools
import io
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLASSES = [
    "normal",
    "idv_01",
    "idv_02",
    "idv_04",
    "idv_05",
    "idv_07",
    "idv_11",
    "idv_14",
    "idv_17",
]
TEACHER_BASE = {
    "patchtst": dict(backbone="patchtst", d_model=64, heads=4, ffn=128, patch=8),
    "deepseek": dict(
        backbone="deepseek", d_model=64, heads=4, ffn=128, patch=8, experts=4, moe_ffn=64
    ),
}
TRAIN_EPISODES, VAL_EPISODES, GOLDEN_EPISODES = 2, 1, 2
POOL_SEED = 500  # pool episode e simulates with generate(seed=POOL_SEED + e)
BLOCK = 20  # consecutive timed calls per package per turn (interleaved_latency)


@dataclass(frozen=True)
class Plan:
    seeds: int
    pool: int  # episodes per class to draw training and validation from
    teacher_epochs: int
    distill_epochs: int
    teacher_layers: tuple[int, ...]
    lrs: tuple[float, ...]
    latency_windows: int


QUICK = Plan(2, 3, 15, 15, (1, 2), (2e-3,), 200)
FULL = Plan(5, 4, 25, 25, (1, 2, 4), (2e-3,), 400)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def concat(parts: list) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])


def split(pool: list, seed: int) -> tuple[list[int], list[int]]:
    """Which pool episodes train and which validate for ``seed``: whole episodes, disjoint."""
    order = np.random.default_rng(seed).permutation(len(pool)).tolist()
    return sorted(order[VAL_EPISODES : VAL_EPISODES + TRAIN_EPISODES]), order[:VAL_EPISODES]


def row(pkg: bytes, params: int, golden, threads: int, windows: int, **extra: Any) -> dict:
    from cloud.model.evaluation import evaluate_package

    m = evaluate_package(pkg, golden.x, golden.y, threads=threads, latency_windows=windows)
    # The package is timed again with every other row, interleaved (see run_seed).
    return {"_package": pkg, **_from_metrics(m, params), **extra}


def interleaved_latency(
    pkgs: dict[str, bytes], x: np.ndarray, n: int, threads: int
) -> dict[str, tuple[float, float]]:
    """p50 and p99 (ms) of batch-1 calls with the packages taking turns, ``BLOCK`` calls
    at a time in a fresh random order each round: load from other jobs slows every row
    alike, and each turn runs warm (one call per turn measured every row cache-cold,
    about 30% slower than alone)."""
    from cloud.model.evaluation import ort_session
    from shared.package import ModelPackage

    sess = {k: ort_session(ModelPackage(p).graph, threads) for k, p in pkgs.items()}
    feed = {k: s.get_inputs()[0].name for k, s in sess.items()}
    windows = x[np.arange(n) % len(x)][:, None]  # (n, 1, T, C)
    for w in windows[:20]:
        for k, s in sess.items():
            s.run(None, {feed[k]: w})
    times = {k: np.empty(n) for k in sess}
    order = np.random.default_rng(0)
    for start in range(0, n, BLOCK):
        for k in order.permutation(list(sess)):
            for i in range(start, min(start + BLOCK, n)):
                t0 = time.perf_counter()
                sess[k].run(None, {feed[k]: windows[i]})
                times[k][i] = time.perf_counter() - t0
    return {
        k: (float(np.percentile(t, 50) * 1e3), float(np.percentile(t, 99) * 1e3))
        for k, t in times.items()
    }


def pack(graph: bytes, model, version: str, ood: dict) -> bytes:
    from cloud.model.export import package_graph

    return package_graph(
        graph,
        model,
        name="edgeloop.bench",
        version=version,
        parent=None,
        profile="baseline",
        class_names=CLASSES,
        metadata={"ood": ood},
    )


def ort_variants(graph: bytes, calib: np.ndarray) -> dict[str, bytes | str]:
    """ORT's own quantizers at their best settings; a variant that fails says why."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from cloud.compress.quantization import split_gemms

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"window": w[None]} for w in calib])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    out: dict[str, bytes | str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src, split_src = Path(tmp) / "in.onnx", Path(tmp) / "split.onnx"
        src.write_bytes(graph)
        onnx.save(split_gemms(onnx.load_from_string(graph)), split_src)
        jobs = {
            "dynamic_per_channel": lambda dst: quantize_dynamic(
                src, dst, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                weight_type=QuantType.QInt8,
            ),
            "dynamic_per_channel_gemm_split": lambda dst: quantize_dynamic(
                split_src, dst, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True},
            ),
            "static_qdq_per_channel": lambda dst: quantize_static(
                src, dst, Reader(), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            ),
        }  # fmt: skip
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # ORT's quantizers log per tensor on the root logger
        try:
            for name, job in jobs.items():
                dst = Path(tmp) / f"{name}.onnx"
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        job(dst)
                    out[name] = dst.read_bytes()
                except Exception as exc:  # a baseline that cannot run is reported, not fatal
                    out[name] = f"failed: {exc!r}"[:300]
        finally:
            root.setLevel(level)
    return out


def ort_baseline(model, ood, x, val, golden, threads, windows) -> dict:
    """The best ORT variant by validation macro-F1 (then size), measured on golden."""
    from cloud.model.evaluation import package_predict
    from cloud.model.export import export_onnx
    from cloud.model.metrics import classification_metrics
    from cloud.model.selection import params_of

    calib = x[np.random.default_rng(0).permutation(len(x))[:256]]
    tried, best = {}, None
    for name, graph in ort_variants(export_onnx(model, ood), calib).items():
        if isinstance(graph, str):
            tried[name] = graph
            continue
        pkg = pack(graph, model, name, ood)
        f1 = classification_metrics(val.y, package_predict(pkg, val.x), CLASSES).macro_f1
        tried[name] = {"val_macro_f1": f1, "bytes": len(pkg)}
        if best is None or (f1, -len(pkg)) > (best[0], -len(best[2])):
            best = (f1, name, pkg)
    if best is None:
        return {"error": "every ORT variant failed", "variants": tried}
    return row(best[2], params_of(model), golden, threads, windows, variant=best[1], tried=tried)


def torch_ao_baseline(teacher, golden, windows: int) -> dict:
    import torch
    from torch import nn

    from cloud.model.evaluation import latency_ms
    from cloud.model.metrics import classification_metrics
    from cloud.model.selection import params_of

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao is deprecated in favour of torchao
        q = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(teacher).eval(), {nn.Linear}, dtype=torch.qint8
        )
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)  # size measurement only; nothing is loaded back
    with torch.no_grad():
        gx = golden.x
        pred = torch.cat([q(torch.as_tensor(gx[i : i + 256])) for i in range(0, len(gx), 256)])
        ev = classification_metrics(golden.y, pred.argmax(1).numpy(), CLASSES)
        p50, p99 = latency_ms(lambda w: q(torch.as_tensor(w)), gx, windows)
    return {
        "params": params_of(teacher),
        "bytes": buf.tell(),
        "latency_ms": p50,
        "latency_p99_ms": p99,
        "macro_f1": ev.macro_f1,
        "recall": ev.recall,
    }


def candidates(kind: str, arch: dict, epochs: int, plan: Plan, layers=(None,)) -> list:
    from cloud.model.selection import Candidate

    return [
        Candidate(kind, {**arch, **({"layers": n} if n else {})}, {"epochs": epochs, "lr": lr})
        for n in layers
        for lr in plan.lrs
    ]


def direct_and_cnn(student, x, y, val, golden, ood, seed, plan, profile) -> dict:
    """The same-size transformer and the CNN, trained directly for the same epochs."""
    from cloud.compress.quantization import plan_table, quantize
    from cloud.model.export import export_onnx
    from cloud.model.selection import params_of, select_model

    epochs = plan.teacher_epochs + plan.distill_epochs
    arch = {k: v for k, v in asdict(student.cfg).items() if k not in ("window", "channels")}
    arch.pop("n_classes")
    out = {}
    for name, kind, a in (("direct", "transformer", arch), ("cnn", "cnn", {})):
        say(f"  {name}: training {epochs} epochs")
        sel = select_model(
            candidates(kind, a, epochs, plan),
            x=x, y=y, val_x=val.x, val_y=val.y, class_names=CLASSES, seed=seed,
        )  # fmt: skip
        graph = export_onnx(sel.model, ood)
        if name == "direct":  # INT8 by the same quantizer and schemes as the edge package
            graph = quantize(graph, plan_table(graph, profile.schemes))
        pkg = pack(graph, sel.model, name, ood)
        out[name] = row(
            pkg, params_of(sel.model), golden, profile.threads, plan.latency_windows,
            val_macro_f1=sel.best.val_macro_f1, chosen=sel.candidate.name,
        )  # fmt: skip
    return out


def run_seed(backbone: str, seed: int, pool: list, golden, profile, plan: Plan) -> dict:
    import torch

    from cloud.compress.distill import DistillConfig
    from cloud.compress.pipeline import compress
    from cloud.model.export import export_onnx
    from cloud.model.ood import ood_calibration
    from cloud.model.selection import params_of, select_model
    from shared.errors import BudgetError

    train_ids, val_ids = split(pool, seed)
    x, y = concat([pool[i] for i in train_ids])
    val = pool[val_ids[0]]
    ood = ood_calibration(x[y == 0])
    say(f"[{backbone} seed {seed}] teacher: {len(plan.teacher_layers) * len(plan.lrs)} candidates")
    t0 = time.perf_counter()
    chosen = select_model(
        candidates("transformer", TEACHER_BASE[backbone], plan.teacher_epochs, plan,
                   plan.teacher_layers),
        x=x, y=y, val_x=val.x, val_y=val.y, class_names=CLASSES, seed=seed,
        progress=lambda m: say(f"  {m}"),
    )  # fmt: skip
    teacher, select_s = chosen.model, time.perf_counter() - t0
    run = functools.partial(
        compress,
        teacher,
        x=x,
        y=y,
        val_x=val.x,
        val_y=val.y,
        golden_x=golden.x,
        golden_y=golden.y,
        class_names=CLASSES,
        ood=ood,
        name=f"edgeloop.bench.{profile.name}",
        version="v1",
        distill_cfg=DistillConfig(epochs=plan.distill_epochs, seed=seed),
        latency_windows=plan.latency_windows,
        progress=lambda m: say(f"  {m}"),
    )
    # p99 on a machine shared with other jobs measures the neighbours: the latency budget
    # is left out of the choice here, and the speedup goal reports latency instead.
    bench_profile = replace(profile, max_latency_ms=math.inf)
    budget_error = None
    try:
        result = run(profile=bench_profile)
    except BudgetError as exc:  # no setting within max_f1_drop_pts on validation
        budget_error = str(exc)
        say(f"  {exc}; falling back to the largest student setting, F1 budget lifted")
        result = run(
            profile=replace(bench_profile, students=profile.students[-1:], max_f1_drop_pts=math.inf)
        )
    s = result.summary()
    torch.set_num_threads(profile.threads)
    w, th = plan.latency_windows, profile.threads
    rows = {
        "teacher": _from_metrics(result.teacher, params_of(teacher)),
        "edge": _from_metrics(result.edge, params_of(result.student)),
    }
    rows.update(direct_and_cnn(result.student, x, y, val, golden, ood, seed, plan, profile))
    say("  ORT and torch.ao baselines")
    rows["ort_teacher"] = ort_baseline(teacher, ood, x, val, golden, th, w)
    rows["ort_student"] = ort_baseline(result.student, ood, x, val, golden, th, w)
    rows["teacher"]["_package"] = pack(export_onnx(teacher, ood), teacher, "teacher", ood)
    rows["edge"]["_package"] = result.package
    pkgs = {k: r.pop("_package") for k, r in rows.items() if "_package" in r}
    for k, (p50, p99) in interleaved_latency(pkgs, golden.x, 2 * w, th).items():
        rows[k].update(latency_ms=p50, latency_p99_ms=p99, latency_ms_alone=rows[k]["latency_ms"])
    rows["torch_ao"] = torch_ao_baseline(teacher, golden, w)
    torch.set_num_threads(1)
    return {
        "seed": seed,
        "train_episodes": [POOL_SEED + i for i in train_ids],
        "val_episodes": [POOL_SEED + i for i in val_ids],
        "train_windows": len(y),
        "val_windows": len(val),
        "teacher": {
            "chosen": chosen.candidate.name,
            "selection_s": round(select_s, 1),
            "candidates": chosen.table(),
        },
        "edge_summary": {
            k: s.get(k)
            for k in ("kept_layers", "block_influence", "val_f1_drop_pts", "f1_drop_pts", "sha256")
        },
        "student_setting": [result.kept_layers, result.student.cfg.ffn],
        "budget_error": budget_error,
        "attempts": [[a.layers, a.ffn_keep, a.missed] for a in result.attempts],
        "rows": rows,
        "load_avg": os.getloadavg(),
    }


def _from_metrics(m, params: int) -> dict:
    return {
        "params": params,
        "bytes": m.package_bytes,
        "latency_ms": m.latency_p50_ms,
        "latency_p99_ms": m.latency_p99_ms,
        "macro_f1": m.macro_f1,
        "recall": m.recall,
    }


def spread(values: list[float], worst: str) -> dict:
    pick = min if worst == "min" else max
    return {
        "worst": pick(values),
        "median": statistics.median(values),
        "per_seed": [round(v, 4) for v in values],
    }


def aggregate(seeds: list[dict]) -> dict:
    """Per row worst/median, paired differences against edge, and the goals."""
    names = list(seeds[0]["rows"])
    rows = {}
    for n in names:
        got = [s["rows"][n] for s in seeds if "macro_f1" in s["rows"][n]]
        if not got:
            continue
        rows[n] = {
            "params": statistics.median(r["params"] for r in got),
            "params_per_seed": [r["params"] for r in got],
            "bytes": statistics.median(r["bytes"] for r in got),
            "latency_ms": statistics.median(r["latency_ms"] for r in got),
            "macro_f1": spread([100 * r["macro_f1"] for r in got], "min"),
        }
    edge = [s["rows"]["edge"] for s in seeds]
    paired = {
        f"edge_minus_{n}_pts": spread(
            [100 * (s["rows"]["edge"]["macro_f1"] - s["rows"][n]["macro_f1"]) for s in seeds],
            "min",
        )
        for n in rows
        if n != "edge" and all("macro_f1" in s["rows"][n] for s in seeds)
    }
    teacher = [s["rows"]["teacher"] for s in seeds]
    size = [t["bytes"] / e["bytes"] for t, e in zip(teacher, edge, strict=True)]
    speed = [t["latency_ms"] / e["latency_ms"] for t, e in zip(teacher, edge, strict=True)]
    drop = [100 * (t["macro_f1"] - e["macro_f1"]) for t, e in zip(teacher, edge, strict=True)]
    vs_direct = [
        100 * (e["macro_f1"] - d["macro_f1"]) >= 1.0
        or (e["bytes"] <= d["bytes"] and e["macro_f1"] >= d["macro_f1"])
        for e, d in ((s["rows"]["edge"], s["rows"]["direct"]) for s in seeds)
    ]
    goals = {
        "size_8x": {**spread(size, "min"), "met": min(size) >= 8},
        "speed_3x": {**spread(speed, "min"), "met": min(speed) >= 3},
        "f1_drop_le_1pt": {**spread(drop, "max"), "met": max(drop) <= 1.0},
        "vs_direct": {
            **paired["edge_minus_direct_pts"],
            "per_seed_met": vs_direct,
            "met": all(vs_direct),
            "rule": "edge - direct >= 1 pt, or edge bytes <= direct bytes at edge F1 >= direct F1",
        },
    }
    return {"rows": rows, "paired": paired, "goals": goals, "meets_goals": all(
        g["met"] for g in goals.values()
    )}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 seeds, fewer epochs and candidates")
    parser.add_argument("--profile", default="rpi4-int8")
    parser.add_argument("--backbones", default="patchtst,deepseek")
    parser.add_argument("--seeds", type=int, default=None, help="paired seeds (default 5; quick 2)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.seeds:
        plan = Plan(**{**asdict(plan), "seeds": args.seeds})

    import torch

    from cloud.compress.profiles import get_profile
    from sim.tep import generate, golden_set

    torch.set_num_threads(1)  # a shared machine; latency runs at the profile's threads anyway
    profile = get_profile(args.profile)
    cache = ROOT / ".edgeloop" / "bench-cache"
    t0 = time.perf_counter()
    say("simulating TEP plants …")
    pool = [
        generate(classes=CLASSES, runs_per_class=1, seed=POOL_SEED + e, cache_dir=cache, workers=2)
        for e in range(plan.pool)
    ]
    golden = golden_set(classes=CLASSES, runs_per_class=GOLDEN_EPISODES, cache_dir=cache, workers=2)
    per = {}
    for backbone in args.backbones.split(","):
        seeds = [run_seed(backbone, s, pool, golden, profile, plan) for s in range(plan.seeds)]
        per[backbone] = {**aggregate(seeds), "seeds": seeds}
    out = {
        "profile": profile.name,
        "threads": profile.threads,
        "quick": args.quick,
        "plan": asdict(plan),
        "classes": CLASSES,
        "data": {
            "pool_episode_seeds": [POOL_SEED + e for e in range(plan.pool)],
            "train_episodes_per_class": TRAIN_EPISODES,
            "val_episodes_per_class": VAL_EPISODES,
            "golden_episodes_per_class": GOLDEN_EPISODES,
            "golden_windows": len(golden),
            "golden_sha256": golden.meta.get("golden_sha256"),
        },
        "params": {b: {n: r["params"] for n, r in v["rows"].items()} for b, v in per.items()},
        "direct_baseline": {
            b: {
                **v["rows"]["direct"],
                "edge_minus_direct_pts": v["paired"]["edge_minus_direct_pts"],
                "goal_met": v["goals"]["vs_direct"]["met"],
            }
            for b, v in per.items()
        },
        "goals": {b: {g: v["goals"][g]["met"] for g in v["goals"]} for b, v in per.items()},
        "meets_goals": all(v["meets_goals"] for v in per.values()),
        "backbones": per,
        "load_avg_end": os.getloadavg(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
