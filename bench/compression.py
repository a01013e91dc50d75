"""Compression: the edge package against the FP32 teacher and the two baselines a user
would try first, on the same golden TEP windows, same machine, same run.

    python bench/compression.py [--quick] [--profile rpi4-int8] [--backbones patchtst,deepseek]

For each backbone (PatchTST; a tiny DeepSeek-V3 with multi-head latent attention and
mixture of experts) the run trains a teacher on simulated TEP plants, then measures on the
frozen golden set, batch 1 under ONNX Runtime with the profile's threads:
  teacher      the FP32 teacher's package (ONNX, the same scores in the graph)
  torch_ao     torch.ao dynamic INT8 of the teacher (nn.Linear), run in torch, 1 thread;
               its size is the serialized quantized state dict
  ort_dynamic  onnxruntime.quantization.quantize_dynamic of the teacher's ONNX graph
  edge         our pipeline: block-influence layer pruning, FFN-channel pruning,
               distillation, per-layer quantization — the package a device would load
Prints one JSON object on the last line; the top-level figures are the first backbone's,
each backbone's are under "backbones".
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLASSES = ["normal", "idv_01", "idv_02", "idv_04", "idv_05", "idv_06", "idv_07", "idv_14"]
TEACHERS = {
    "patchtst": dict(d_model=64, layers=6, heads=4, ffn=128, patch=8),
    "deepseek": dict(
        d_model=64, layers=6, heads=4, ffn=128, patch=8, experts=4, moe_ffn=64, dense_layers=1
    ),
}


def torch_ao_baseline(teacher, gx, gy, class_names, windows: int) -> dict:
    import numpy as np
    import torch
    from torch import nn

    from cloud.model.evaluation import latency_ms
    from cloud.model.metrics import classification_metrics

    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")  # torch.ao is deprecated in favour of torchao
        q = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(teacher).eval(), {nn.Linear}, dtype=torch.qint8
        )
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)  # size measurement only; nothing is loaded back
    with torch.no_grad():
        pred = torch.cat([q(torch.as_tensor(gx[i : i + 256])) for i in range(0, len(gx), 256)])
        ev = classification_metrics(gy, pred.argmax(1).numpy(), class_names)
        p50, p99 = latency_ms(lambda w: q(torch.as_tensor(w)), gx, windows)
    del np
    return {"bytes": buf.tell(), "latency_ms": p50, "latency_p99_ms": p99, "macro_f1": ev.macro_f1}


def ort_dynamic_baseline(teacher, ood, gx, gy, class_names, threads, windows) -> dict:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from cloud.model.evaluation import evaluate_package
    from cloud.model.export import export_onnx, package_graph

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "teacher.onnx", Path(tmp) / "q.onnx"
        src.write_bytes(export_onnx(teacher, ood))
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        graph = onnx.load(dst).SerializeToString()
    pkg = package_graph(
        graph,
        teacher,
        name="bench",
        version="ort-dynamic",
        parent=None,
        profile="baseline",
        class_names=class_names,
        metadata={"ood": ood},
    )
    m = evaluate_package(pkg, gx, gy, threads=threads, latency_windows=windows)
    return {
        "bytes": m.package_bytes,
        "latency_ms": m.latency_p50_ms,
        "latency_p99_ms": m.latency_p99_ms,
        "macro_f1": m.macro_f1,
    }


def run_backbone(backbone: str, data, golden, profile, quick: bool) -> dict:
    import torch

    from cloud.compress.distill import DistillConfig
    from cloud.compress.pipeline import compress
    from cloud.model.configs import TrainConfig
    from cloud.model.ood import ood_calibration
    from cloud.model.train import train
    from cloud.model.transformer import ModelSpec, build

    normal = data.x[data.y == 0]
    spec = ModelSpec(backbone=backbone, n_classes=len(CLASSES), **TEACHERS[backbone])
    teacher = build(spec, normal)
    t0 = time.perf_counter()
    epochs = 25 if quick else 40
    print(f"[{backbone}] training the teacher ({epochs} epochs) …", file=sys.stderr)
    train(teacher, data.x, data.y, TrainConfig(epochs=epochs, lr=2e-3))
    teacher.eval()
    train_s = time.perf_counter() - t0
    ood = ood_calibration(normal)
    windows = 200 if quick else 500
    result = compress(
        teacher,
        x=data.x,
        y=data.y,
        golden_x=golden.x,
        golden_y=golden.y,
        class_names=CLASSES,
        profile=profile,
        ood=ood,
        name=f"edgeloop.bench.{profile.name}",
        version="v1",
        distill_cfg=DistillConfig(epochs=25 if quick else 40),
        latency_windows=windows,
        progress=lambda m: print(f"[{backbone}] {m}", file=sys.stderr),
    )
    print(f"[{backbone}] baselines …", file=sys.stderr)
    torch.set_num_threads(profile.threads)
    s = result.summary()
    s["baselines"] = {
        "torch_ao_dynamic_int8": torch_ao_baseline(teacher, golden.x, golden.y, CLASSES, windows),
        "ort_quantize_dynamic": ort_dynamic_baseline(
            teacher, ood, golden.x, golden.y, CLASSES, profile.threads, windows
        ),
    }
    s["teacher_train_s"] = train_s
    s["teacher_params"] = sum(p.numel() for p in teacher.parameters())
    s["edge_params"] = sum(p.numel() for p in result.student.parameters())
    s["quantization"] = {r.scheme: 0 for r in result.table}
    for r in result.table:
        s["quantization"][r.scheme] += 1
    b = s["baselines"]
    s["meets_goals"] = bool(
        s["size_ratio"] >= 8
        and s["speedup"] >= 3
        and s["f1_drop_pts"] <= 1.0
        and all(
            s["edge_bytes"] < v["bytes"] and s["edge_macro_f1"] >= v["macro_f1"] for v in b.values()
        )
    )
    return s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="less data and fewer epochs (<5 min)")
    parser.add_argument("--profile", default="rpi4-int8")
    parser.add_argument("--backbones", default="patchtst,deepseek")
    args = parser.parse_args()

    import torch

    from cloud.compress.profiles import get_profile
    from sim.tep import generate, golden_set

    torch.set_num_threads(2)
    profile = get_profile(args.profile)
    cache = ROOT / ".edgeloop" / "bench-cache"
    print("simulating TEP plants …", file=sys.stderr)
    data = generate(
        classes=CLASSES,
        runs_per_class=3 if args.quick else 6,
        seed=0,
        horizon_h=6.0,
        cache_dir=cache,
        workers=2,
    )
    golden = golden_set(classes=CLASSES, runs_per_class=2, cache_dir=cache, workers=2)
    t0 = time.perf_counter()
    per = {}
    for backbone in args.backbones.split(","):
        torch.set_num_threads(2)
        per[backbone] = run_backbone(backbone, data, golden, profile, args.quick)
    first = per[next(iter(per))]
    keys = [
        "teacher_bytes",
        "edge_bytes",
        "size_ratio",
        "teacher_latency_ms",
        "edge_latency_ms",
        "speedup",
        "teacher_macro_f1",
        "edge_macro_f1",
        "f1_drop_pts",
        "baselines",
    ]
    out = {k: first[k] for k in keys}
    out.update(
        {
            "profile": profile.name,
            "threads": profile.threads,
            "quick": args.quick,
            "train_windows": len(data),
            "golden_windows": len(golden),
            "classes": CLASSES,
            "backbones": per,
            "meets_goals": all(v["meets_goals"] for v in per.values()),
            "wall_s": time.perf_counter() - t0,
        }
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
