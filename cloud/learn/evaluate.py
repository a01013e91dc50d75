"""The evaluate stage: the round's package under ONNX Runtime, never the torch model it came
from, on the frozen golden set and a held-out slice of the new uploads; the gates
(cloud.learn.gates) judge it against its parent's package."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cloud.compress.profiles import load_profiles
from cloud.learn.gates import GateLimits, Predictions, judge
from cloud.learn.state import EvaluateOutput, RoundState, Services
from cloud.model.evaluation import latency_ms, ort_predict, ort_session, package_predict
from cloud.model.metrics import classification_metrics
from cloud.store.datasets import label_indices, load_dataset
from cloud.store.records import version_row
from cloud.store.windows import load_samples
from shared.package import ModelPackage, model_name


def stage_evaluate(svc: Services, st: RoundState, say: Callable[[str], None]) -> EvaluateOutput:
    cfg, trained = st.cfg, st.outputs["train"]
    package = svc.store.get(st.outputs["recompress"]["package_key"])
    class_names = list(ModelPackage(package).manifest.class_names)
    profile = load_profiles().get(st.profile)
    threads = profile.threads if profile is not None else 1
    golden = load_dataset(store=svc.store, name=cfg.golden_dataset)
    # One ONNX Runtime session for every measure of the candidate.
    sess = ort_session(ModelPackage(package).graph, threads)
    pred = ort_predict(sess, golden.x)
    known = np.isin(golden.labels, class_names)
    ev = classification_metrics(
        label_indices(golden.labels[known], class_names), pred[known], class_names
    )
    metrics = ev.metrics("golden")
    parent = None
    if trained["parent"] is not None:
        row = version_row(svc.sessions, model_name(st.fleet, st.profile), trained["parent"])
        parent_pred = package_predict(svc.store.get(row.object_key), golden.x, threads=threads)
        parent = Predictions(parent_pred, list(row.class_names))
    holdout_labels = [c for _, c in trained["holdout"]]
    holdout_pred = None
    if holdout_labels:
        hx = load_samples(
            sessions=svc.sessions, store=svc.store, ids=[i for i, _ in trained["holdout"]]
        )
        holdout_pred = ort_predict(sess, hx)
    report = judge(
        golden_labels=golden.labels,
        candidate=Predictions(pred, class_names),
        limits=GateLimits(
            max_old_f1_drop_pts=cfg.max_old_f1_drop_pts,
            max_detection_drop_pts=cfg.max_detection_drop_pts,
            min_new_recall=cfg.min_new_recall,
        ),
        parent=parent,
        holdout_labels=holdout_labels,
        holdout_pred=holdout_pred,
        new_classes=trained["new_classes"],
    )
    metrics["golden_detection_rate"] = report.detection_rate
    name = sess.get_inputs()[0].name
    p50, p99 = latency_ms(lambda w: sess.run(["logits"], {name: w}), golden.x, 100)
    metrics.update(latency_p50_ms=p50, latency_p99_ms=p99, package_kb=len(package) / 1024)
    if report.old_f1_drop_pts is not None:
        metrics["old_f1_drop_pts"] = report.old_f1_drop_pts
    if report.holdout_new_recall is not None:
        metrics.update({f"holdout_recall_{k}": v for k, v in report.holdout_new_recall.items()})
    say(
        f"gates {'passed' if report.passed else 'failed: ' + '; '.join(report.failed)} "
        f"(golden macro-F1 {ev.macro_f1:.3f}, detection {report.detection_rate:.3f})"
    )
    return {
        "metrics": metrics,
        "gates": report.as_dict(),
        "confusion": ev.confusion.tolist(),
        "class_names": class_names,
    }
