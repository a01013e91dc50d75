"""Delta-friendly recompression on real TEP windows: the previous INT8 grid kept, code changes
held to where weights moved and to a budget, unmerged adapters over untouched base codes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cloud.compress.adapters import adapter_round, merge_adapters, with_adapters
from cloud.compress.close_training import CloseConfig, anchors
from cloud.compress.delta_friendly import (
    delta_friendly_student,
    recompress_close_to,
    recompress_gated,
)
from cloud.compress.grid import int8_weights
from cloud.compress.quantization import plan_table, quantize
from cloud.model.evaluation import package_predict
from cloud.model.export import export_onnx, package_graph
from cloud.model.ood import ood_calibration
from cloud.model.train import extend_classes
from cloud.model.transformer import ModelSpec, build
from shared.onnxwire import tensor_ranges
from shared.package import ModelPackage

SCHEMES = {"attention": "int8", "ffn": "int8", "other": "int8"}  # rpi4-int8's


@pytest.fixture(scope="module")
def base(tep_small):
    """A small trained DeepSeek student as rpi4-int8 packages it (every Linear INT8), with
    the quantization table in its manifest as compress() writes it."""
    data, _ = tep_small
    torch.set_num_threads(2)
    spec = ModelSpec(
        backbone="deepseek", n_classes=3, d_model=16, layers=1, heads=2, ffn=32, moe_ffn=16,
        kv_rank=8, q_rank=8,
    )  # fmt: skip
    keep = data.y < 3
    x, y = data.x[keep], data.y[keep]
    model = build(spec, x[y == 0])
    from cloud.model.configs import TrainConfig
    from cloud.model.train import train

    train(model, x, y, TrainConfig(epochs=4, lr=3e-3))
    ood = ood_calibration(x[y == 0])
    graph = export_onnx(model, ood)
    rows = plan_table(graph, SCHEMES)
    names = data.class_names[:3]
    pkg = package_graph(
        quantize(graph, rows), model, name="edgeloop.t.rpi4-int8", version="v0", parent=None,
        profile="rpi4-int8", class_names=names,
        metadata={"ood": ood, "compression": {"quantization": [[r.module, r.weight, r.scheme]
                                                               for r in rows]}},
    )  # fmt: skip
    return model, pkg, data


def tensors(package: bytes) -> dict[str, bytes]:
    return {t.name: package[t.offset : t.offset + t.length] for t in tensor_ranges(package)}


def close(model, pkg, names, student, **kw):
    return recompress_close_to(
        previous_package=pkg, previous_student=model, teacher=model, x=np.empty(0),
        y=np.empty(0), class_names=names, version="v1", parent="v0", student=student, **kw,
    )  # fmt: skip


def test_the_same_student_on_the_kept_grid_changes_no_tensor(base):
    """Requantizing the unchanged student on its own grid gives every tensor byte for byte."""
    # Prepare
    model, pkg, data = base
    names = data.class_names[:3]
    # Execute
    out = close(model, pkg, names, copy.deepcopy(model))
    # Assert
    assert out.grid.changed == 0 and out.grid.regridded_columns == 0
    assert tensors(out.package) == tensors(pkg)


def test_grid_kept_moves_only_the_codes_of_weights_that_moved(base):
    """Weights moved by three steps change exactly their own codes; scales, zero points,
    FP32 tensors and the graph's structure stay as they were."""
    # Prepare
    model, pkg, data = base
    names = data.class_names[:3]
    student = copy.deepcopy(model)
    pull = anchors(student, ModelPackage(pkg).graph)
    target = max(pull, key=lambda a: a.ref.numel())
    rows, cols = np.array([1, 3, 5]), np.array([2, 4, 6])
    with torch.no_grad():
        target.param[rows, cols] += 3 * target.step[rows, 0]
    # Execute
    out = close(model, pkg, names, student)
    # Assert
    before, after = tensors(pkg), tensors(out.package)
    changed = {n for n in before if before[n] != after[n]}
    assert len(changed) == 1 and next(iter(changed)).endswith("_quantized")
    old_w, new_w = (
        int8_weights(ModelPackage(pkg).graph),
        int8_weights(ModelPackage(out.package).graph),
    )
    name = next(iter(changed))[: -len("_quantized")]
    diff = np.argwhere(old_w[name][0] != new_w[name][0])  # (K, N) = the weight transposed
    assert sorted(map(tuple, diff)) == sorted(zip(cols, rows, strict=True))
    assert out.grid.changed == 3


def test_a_budget_caps_the_share_of_codes_that_move(base):
    """With every weight moved, a 1% budget lets at most 1% of the kept-grid codes change."""
    # Prepare
    model, pkg, data = base
    student = copy.deepcopy(model)
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in anchors(student, ModelPackage(pkg).graph):
            a.param += torch.randn(a.param.shape, generator=rng) * 2 * a.step
    # Execute
    free = close(model, pkg, data.class_names[:3], student)
    capped = close(model, pkg, data.class_names[:3], student, budget=0.01)
    # Assert
    assert free.grid.changed_share > 0.3
    assert capped.grid.changed <= int(0.01 * capped.grid.codes)
    assert capped.grid.changed > 0


def test_a_new_class_adds_a_head_column_and_the_package_runs(base):
    """A fourth class keeps the old head columns' scales, adds a column on a fresh grid, and
    the package opens and predicts all four classes under ONNX Runtime."""
    # Prepare
    model, pkg, data = base
    names = data.class_names[:4]
    # Execute
    teacher = extend_classes(copy.deepcopy(model), 4)
    student = delta_friendly_student(
        previous_student=model, previous_package=pkg, teacher=teacher, x=data.x[:64],
        y=np.minimum(data.y[:64], 3), n_classes=4, share=0.05,
        cfg=CloseConfig(epochs=1),
    )  # fmt: skip
    out = close(model, pkg, names, student)
    # Assert
    assert out.grid.new_columns == 1
    old_w, new_w = (
        int8_weights(ModelPackage(pkg).graph),
        int8_weights(ModelPackage(out.package).graph),
    )
    head = next(n for n in old_w if n.endswith("head.weight_t"))
    head_old, head_new = old_w[head], new_w[head]
    assert head_new[0].shape == (head_old[0].shape[0], 4)
    assert head_new[1][:3].tobytes() == head_old[1].tobytes()
    assert ModelPackage(out.package).manifest.class_names == tuple(names)
    assert set(package_predict(out.package, data.x)) <= {0, 1, 2, 3}


def test_saliency_masks_leave_all_other_codes_in_place(base):
    """Trained with 5% of the INT8 weights free, at most that share of the codes outside
    the head moves."""
    # Prepare
    model, pkg, data = base
    keep = data.y < 3
    # Execute
    student = delta_friendly_student(
        previous_student=model, previous_package=pkg, teacher=model, x=data.x[keep],
        y=data.y[keep], n_classes=3, share=0.05, cfg=CloseConfig(epochs=2, lr=1e-3),
    )  # fmt: skip
    out = close(model, pkg, data.class_names[:3], student)
    # Assert
    body = {n: v for n, v in out.grid.per_tensor.items() if not n.startswith("head")}
    changed, codes = (sum(v[i] for v in body.values()) for i in (0, 1))
    assert 0 < changed <= 0.05 * codes + 1


def test_unmerged_adapters_keep_the_base_codes_byte_identical(base):
    """An adapter round's package holds every base tensor under its base name and bytes,
    adds only the adapters, runs under ONNX Runtime, and merges back to a plain package."""
    # Prepare
    model, pkg, data = base
    names = data.class_names[:3]
    keep = data.y < 3
    adapted = with_adapters(model, pkg, rank=2, n_classes=3)
    # Execute
    out = adapter_round(
        base_package=pkg, previous_package=pkg, model=adapted, teacher=model, x=data.x[keep],
        y=data.y[keep], class_names=names, version="v1", parent="v0",
        cfg=CloseConfig(epochs=1, lr=1e-3),
    )  # fmt: skip
    merged = close(model, out.package, names, merge_adapters(out.student))
    # Assert
    before, after = tensors(pkg), tensors(out.package)
    base_codes = {n for n in before if n.endswith(("_quantized", "_scale", "_zero_point"))}
    assert base_codes and all(after[n] == before[n] for n in base_codes if "head" not in n)
    assert len(set(after) - set(before)) >= 6  # two INT8 matrices per adapted layer, at least
    pred = package_predict(out.package, data.x[keep])
    assert (pred == data.y[keep]).mean() > 0.5
    assert set(tensors(merged.package)) == set(before)


def test_the_gate_ships_the_first_rung_that_passes_or_none(base):
    """recompress_gated returns the first rung its check accepts, and None (with every rung
    tried) when the check refuses them all."""
    # Prepare
    model, pkg, data = base
    keep = data.y < 3
    args = dict(
        previous_package=pkg, previous_student=model, teacher=model, x=data.x[keep],
        y=data.y[keep], class_names=data.class_names[:3], version="v1", parent="v0",
        cfg=CloseConfig(epochs=1), ladder=((0.01, 1, "movement"), (None, 1, "gradient")),
    )  # fmt: skip
    # Execute
    first, steps_ok = recompress_gated(**args, accept=lambda p: True)
    none, steps_no = recompress_gated(**args, accept=lambda p: False)
    # Assert
    assert first is not None and [s.share for s in steps_ok] == [0.01]
    assert none is None and [(s.share, s.passed) for s in steps_no] == [
        (0.01, False),
        (None, False),
    ]
