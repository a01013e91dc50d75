"""Compression pipeline on real TEP windows: pruning, distillation, per-layer quantization,
the exact edge artifact, profiles and budgets. Both backbones."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from cloud.compress.distill import DistillConfig, distill
from cloud.compress.pipeline import compress
from cloud.compress.profiles import HardwareProfile, load_profiles
from cloud.compress.pruning import block_influence, ffn_importance, prune_ffn, prune_layers
from cloud.compress.quantization import inspect_schemes, plan_table, quantize
from cloud.compress.report import write_report
from cloud.model.checkpoint import from_bytes, to_bytes
from cloud.model.configs import TrainConfig
from cloud.model.evaluation import evaluate_package
from cloud.model.export import export_onnx, package_graph
from cloud.model.metrics import classification_metrics
from cloud.model.ood import ood_calibration
from cloud.model.train import predict, train
from cloud.model.transformer import ModelSpec, build
from shared.errors import BudgetError, ConfigError, PackageError
from shared.package import ModelPackage

CLASSES = ["normal", "idv_01", "idv_02", "idv_04", "idv_05", "idv_06", "idv_07", "idv_14"]
BACKBONES = ["patchtst", "deepseek"]


@pytest.fixture(scope="session")
def tep_faults():
    """Eight classes of real TEP windows (normal and seven faults): train and golden."""
    from sim.tep import generate, golden_set
    from tests.conftest import TEP_CACHE

    data = generate(
        classes=CLASSES, runs_per_class=2, seed=0, horizon_h=4.0, cache_dir=TEP_CACHE, workers=2
    )
    golden = golden_set(classes=CLASSES, horizon_h=4.0, cache_dir=TEP_CACHE, workers=2)
    return data, golden


@pytest.fixture(scope="session")
def tep_validation():
    """Other episodes of the same classes (seeds of neither training nor golden)."""
    from sim.tep import generate
    from tests.conftest import TEP_CACHE

    return generate(
        classes=CLASSES, runs_per_class=1, seed=41, horizon_h=4.0, cache_dir=TEP_CACHE, workers=2
    )


@pytest.fixture(scope="session")
def teachers(tep_faults):
    """A small trained teacher per backbone, three layers each."""
    data, _ = tep_faults
    torch.set_num_threads(2)
    out = {}
    for backbone in BACKBONES:
        spec = ModelSpec(
            backbone=backbone, n_classes=len(CLASSES), d_model=32, layers=3, heads=2, ffn=64,
            moe_ffn=32,
        )  # fmt: skip
        model = build(spec, data.x[data.y == 0])
        train(model, data.x, data.y, TrainConfig(epochs=20, lr=2e-3))
        out[backbone] = model.eval()
    return out


def f1(model, golden) -> float:
    return classification_metrics(golden.y, predict(model, golden.x), CLASSES).macro_f1


def ood(data):
    return ood_calibration(data.x[data.y == 0])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_layer_pruning_removes_exactly_the_reported_layers(teachers, tep_faults, backbone):
    """The pruned model holds the kept blocks' weights, in order, and nothing of the rest."""
    teacher = teachers[backbone]
    data, _ = tep_faults
    influence = block_influence(teacher, data.x)
    keep = sorted(np.argsort(influence)[-2:].tolist())  # the two most influential

    pruned = prune_layers(teacher, keep)

    assert len(influence) == 3 and all(b > 0 for b in influence)
    assert pruned.cfg.layers == 2 and len(pruned.layers) == 2
    for new_i, old_i in enumerate(keep):
        old = teacher.layers[old_i].state_dict()
        for name, value in pruned.layers[new_i].state_dict().items():
            assert torch.equal(value, old[name]), (new_i, old_i, name)
    removed = (set(range(3)) - set(keep)).pop()
    removed_state = teacher.layers[removed].state_dict()
    for layer in pruned.layers:  # the dropped block's weights are nowhere in the new model
        for name, value in layer.state_dict().items():
            other = removed_state.get(name)  # a dense and an MoE block differ in names
            same_shape = other is not None and other.shape == value.shape
            if value.unique().numel() == 1:
                continue  # constant initial values (zeros, ones) prove nothing
            assert not (same_shape and torch.equal(value, other)), name


@pytest.mark.parametrize("backbone", BACKBONES)
def test_ffn_pruning_keeps_the_most_important_channels(teachers, tep_faults, backbone):
    """Every FFN keeps half its width, and the channels kept are those scored highest."""
    teacher = teachers[backbone]
    data, _ = tep_faults
    sites = ffn_importance(teacher, data.x)

    pruned = prune_ffn(teacher, sites, 0.5)

    assert pruned.cfg.ffn == 32 and pruned.cfg.moe_ffn == 16
    site = sites[0]  # the first layer's FFN: PatchTST's ff, DeepSeek's dense MLP
    top = site.score.topk(32).indices.sort().values
    old = teacher.get_submodule(site.path)
    new = pruned.get_submodule(site.path)
    if backbone == "patchtst":
        assert torch.equal(new[0].weight, old[0].weight[top])
        assert torch.equal(new[3].weight, old[3].weight[:, top])
    else:
        assert torch.equal(new.gate_proj.weight, old.gate_proj.weight[top])
        assert torch.equal(new.down_proj.weight, old.down_proj.weight[:, top])
        experts = next(s for s in sites if s.kind == "experts")
        e_old = teacher.get_submodule(experts.path)
        e_new = pruned.get_submodule(experts.path)
        assert e_new.gate_up_proj.shape == (4, 2 * 16, 32)
        assert e_new.down_proj.shape == (4, 32, 16)
        for e in range(4):  # each expert keeps its own top channels, gate and up paired
            idx = experts.score[e].topk(16).indices.sort().values
            assert torch.equal(e_new.gate_up_proj[e, :16], e_old.gate_up_proj[e, idx])
            assert torch.equal(e_new.gate_up_proj[e, 16:], e_old.gate_up_proj[e, 32 + idx])
            assert torch.equal(e_new.down_proj[e], e_old.down_proj[e][:, idx])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_student_pruned_from_the_teacher_beats_a_fresh_one_of_its_size(
    teachers, tep_faults, backbone
):
    """What the pipeline's recovery step really gains, on the same labels (a quarter of the
    windows) and the same 10 epochs: the student pruned from the teacher's layers and
    distilled beats the same architecture from fresh weights by a wide margin. Claimed no
    further: against the same pruned student fine-tuned on the labels alone, distillation
    measured −1.9 pts (PatchTST) and +3.7 pts (DeepSeek) macro-F1 here, and with every
    label it does not beat a same-size model trained directly (bench/compression.py)."""
    teacher = teachers[backbone]
    data, golden = tep_faults
    labelled = np.random.default_rng(0).random(len(data.y)) < 0.25
    keep = [int(np.argmax(block_influence(teacher, data.x)))]
    shallow = prune_layers(teacher, keep)
    student = prune_ffn(shallow, ffn_importance(shallow, data.x), 0.5)
    torch.manual_seed(0)
    fresh = build(student.cfg, data.x[data.y == 0])

    distill(student, teacher, data.x, np.where(labelled, data.y, -1), DistillConfig(epochs=10))
    train(fresh, data.x[labelled], data.y[labelled], TrainConfig(epochs=10, lr=2e-3))

    # Measured: 0.83–0.88 pruned and distilled against 0.60–0.63 fresh.
    assert f1(student, golden) >= f1(fresh.eval(), golden) + 0.10


@pytest.mark.parametrize("backbone", BACKBONES)
def test_quantized_layers_are_the_ones_the_table_says(teachers, tep_faults, backbone):
    """Reading the finished graph back gives, for every weight, the scheme in the table."""
    data, _ = tep_faults
    graph = export_onnx(teachers[backbone], ood(data))
    schemes = {"attention": "int8", "ffn": "int4", "other": "fp16"}

    rows = plan_table(graph, schemes)
    quantized = quantize(graph, rows)

    got = inspect_schemes(quantized, [r.weight for r in rows])
    assert got == {r.weight: r.scheme for r in rows}
    by_role = {role: {r.scheme for r in rows if r.role == role} for role in ("attention", "ffn")}
    assert by_role["attention"] == {"int8"}
    assert by_role["ffn"] == {"int4"}
    assert {r.scheme for r in rows if r.role == "other"} == {"fp16"}
    if backbone == "deepseek":
        routers = [r for r in rows if r.role == "router"]
        assert len(routers) == 2 and all(r.scheme == "fp32" for r in routers)  # 2 MoE layers
    assert len(quantized) < len(graph)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_exported_package_matches_torch(teachers, tep_faults, backbone):
    """FP32 package: ORT logits within 1e-4 of torch at batch 1, 2, 8. INT8 package: within
    the stated tolerance below."""
    teacher = teachers[backbone]
    data, golden = tep_faults
    graph = export_onnx(teacher, ood(data))
    kw = dict(name="t", version="v1", parent=None, profile="p", class_names=CLASSES,
              metadata={"ood": ood(data)})  # fmt: skip
    fp32 = ModelPackage(package_graph(graph, teacher, **kw))
    rows = plan_table(graph, {"attention": "int8", "ffn": "int8", "other": "int8"})
    int8 = ModelPackage(package_graph(quantize(graph, rows), teacher, **kw))
    import onnxruntime as ort

    with torch.no_grad():
        ref = teacher(torch.as_tensor(golden.x)).numpy()
    sess = ort.InferenceSession(fp32.graph, providers=["CPUExecutionProvider"])
    for b in (1, 2, 8):
        out = sess.run(["logits"], {"window": golden.x[:b]})[0]
        assert np.abs(out - ref[:b]).max() < 1e-4
    q = ort.InferenceSession(int8.graph, providers=["CPUExecutionProvider"])
    q_logits = q.run(["logits"], {"window": golden.x})[0]
    # Stated tolerance for INT8 everywhere (embedding and head included): mean logit error
    # within 5% of the logits' spread (measured 3.3–3.5%); windows near a class boundary
    # may flip (measured 94–98% agreement on these small teachers).
    assert np.abs(q_logits - ref).mean() <= 0.05 * ref.std()
    assert (q_logits.argmax(1) == ref.argmax(1)).mean() >= 0.90


@pytest.mark.parametrize("backbone", BACKBONES)
def test_packaging_the_same_model_twice_gives_the_same_sha256(teachers, tep_faults, backbone):
    """Export, quantize and package twice, and after a checkpoint round trip: same bytes
    (TorchScript exporter for DeepSeek, dynamo for PatchTST)."""
    data, _ = tep_faults
    teacher = teachers[backbone]
    kw = dict(name="t", version="v1", parent=None, profile="p", class_names=CLASSES,
              metadata={"ood": ood(data)})  # fmt: skip

    def package(model):
        graph = export_onnx(model, ood(data))
        return package_graph(quantize(graph, plan_table(graph, {"ffn": "int4"})), model, **kw)

    rebuilt, names = from_bytes(to_bytes(teacher, CLASSES))
    first, second, third = package(teacher), package(teacher), package(rebuilt)

    assert names == CLASSES
    assert ModelPackage(first).sha256 == ModelPackage(second).sha256 == ModelPackage(third).sha256


def test_unmeetable_profile_names_the_budget(teachers, tep_faults, tep_validation):
    """A profile no student can fit fails before any training, naming the missed budget."""
    data, golden = tep_faults
    val = tep_validation
    tiny = HardwareProfile(name="toaster", max_package_kb=4, max_latency_ms=0.0001,
                           students=((1, 0.5), (1, 0.25)))  # fmt: skip

    with pytest.raises(BudgetError) as err:
        compress(
            teachers["patchtst"], x=data.x, y=data.y, val_x=val.x, val_y=val.y,
            golden_x=golden.x, golden_y=golden.y,
            class_names=CLASSES, profile=tiny, ood=ood(data), name="t", version="v1",
            latency_windows=30,
        )  # fmt: skip

    msg = str(err.value)
    assert err.value.reason == "budget_missed"
    assert "toaster" in msg and "max_package_kb 4" in msg and "max_latency_ms" in msg
    assert "layers=1, ffn=25%" in msg  # every setting tried is accounted for


def test_compress_ships_a_package_the_edge_agent_runs(
    teachers, tep_faults, tep_validation, tmp_path
):
    """End to end on one profile: budgets met on the validation set, report written, and
    the edge runtime loads the package and classifies golden windows as the evaluation
    said."""
    from edge_agent.runtime import ModelRuntime

    data, golden = tep_faults
    val = tep_validation
    profile = replace(load_profiles()["mcu-int4"], max_package_kb=400, max_f1_drop_pts=15.0)

    result = compress(
        teachers["deepseek"], x=data.x, y=data.y, val_x=val.x, val_y=val.y,
        golden_x=golden.x, golden_y=golden.y,
        class_names=CLASSES, profile=profile, ood=ood(data), name="edgeloop.t.mcu-int4",
        version="v2", parent="v1", distill_cfg=DistillConfig(epochs=10), latency_windows=50,
    )  # fmt: skip
    paths = write_report(result, tmp_path / "report")

    pkg = ModelPackage(result.package)
    assert pkg.manifest.profile == "mcu-int4" and pkg.manifest.parent == "v1"
    assert pkg.manifest.metadata["compression"]["kept_layers"] == result.kept_layers
    assert sorted(result.kept_layers + result.removed_layers) == [0, 1, 2]
    assert result.edge.package_bytes == len(result.package) < result.teacher.package_bytes
    # Chosen on validation: its drop there is within the budget; golden only reports.
    assert result.summary()["val_f1_drop_pts"] <= profile.max_f1_drop_pts
    assert result.edge_val.macro_f1 != result.edge.macro_f1
    assert result.edge.peak_rss_mb is not None and result.edge.peak_rss_mb < 150
    assert [s.name for s in result.stages][0] == "teacher fp32" and len(result.stages) == 5
    report = json.loads(paths["json"].read_text())
    assert report["sha256"] == pkg.sha256 and report["quantization"]
    assert paths["plot"].stat().st_size > 10_000
    assert "| module |" in paths["markdown"].read_text()
    runtime = ModelRuntime(pkg, threads=1)
    predicted = [d.predicted for d in runtime.detect(golden.x)]
    acc = np.mean([p == CLASSES[y] for p, y in zip(predicted, golden.y, strict=True)])
    assert acc == pytest.approx(result.edge.accuracy)


def test_corrupt_or_truncated_edge_package_is_refused(teachers, tep_faults):
    """A truncated or bit-flipped package is refused on load with a named reason."""
    data, golden = tep_faults
    teacher = teachers["patchtst"]
    graph = export_onnx(teacher, ood(data))
    good = package_graph(quantize(graph, plan_table(graph, {"ffn": "int8"})), teacher,
                        name="t", version="v1", parent=None, profile="p", class_names=CLASSES,
                        metadata={})  # fmt: skip
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF

    with pytest.raises(PackageError) as truncated:
        evaluate_package(good[: len(good) // 2], golden.x, golden.y, threads=1)
    with pytest.raises(PackageError) as tampered:
        evaluate_package(bytes(flipped), golden.x, golden.y, threads=1)

    assert truncated.value.reason == "corrupt_package"
    assert tampered.value.reason in ("sha_mismatch", "corrupt_package")


def test_shipped_profiles_load_and_bad_ones_are_refused(tmp_path):
    """profiles.toml holds the three device classes; an unknown scheme is a ConfigError."""
    profiles = load_profiles()
    bad = tmp_path / "p.toml"
    bad.write_text('[x]\nattention = "int3"\n')

    assert {"rpi4-int8", "jetson-fp16", "mcu-int4"} <= set(profiles)
    assert profiles["mcu-int4"].ffn == "int4" and profiles["jetson-fp16"].threads == 2
    with pytest.raises(ConfigError, match="int3"):
        load_profiles(bad)


def test_checkpoint_round_trip_rebuilds_the_model(teachers, tep_faults):
    """Spec + safetensors rebuild a pruned model exactly: every artifact can be rebuilt."""
    _, golden = tep_faults
    pruned = prune_layers(copy.deepcopy(teachers["deepseek"]), [0, 2])

    rebuilt, _ = from_bytes(to_bytes(pruned, CLASSES))

    x = torch.as_tensor(golden.x[:8])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned(x))
    assert rebuilt.cfg == pruned.cfg and rebuilt.cfg.layers == 2 and rebuilt.cfg.dense_layers == 1


def test_compress_command_exits_2_naming_the_budget(teachers, tep_faults, tep_validation, tmp_path):
    """`edgeloop compress` with a profile nothing fits: exit 2, the budget named, no package."""
    import subprocess
    import sys

    data, golden = tep_faults
    for name, d in (("train", data), ("validation", tep_validation), ("golden", golden)):
        np.savez(tmp_path / f"{name}.npz", x=d.x, y=d.y, class_names=np.array(CLASSES))
    (tmp_path / "teacher.safetensors").write_bytes(to_bytes(teachers["deepseek"], CLASSES))
    (tmp_path / "profiles.toml").write_text(
        '[watch]\nmax_package_kb = 2\nstudents = [[1, 0.5]]\nattention = "int8"\n'
    )
    edgeloop = [sys.executable, "-c", "from shared.cli import main; main()"]

    out = subprocess.run(
        [*edgeloop, "compress", "--profile", "watch", "--teacher", "teacher.safetensors",
         "--data", "train.npz", "--validation", "validation.npz", "--golden", "golden.npz",
         "--profiles-file", "profiles.toml", "--out", "out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip

    assert out.returncode == 2, out.stderr
    assert "max_package_kb 2" in out.stderr and "'watch'" in out.stderr
    assert not (tmp_path / "out").exists()


def test_sets_that_share_windows_are_refused(teachers, tep_faults, tep_validation, tmp_path):
    """Validation or golden windows that are also training windows: refused, naming both."""
    from cloud.compress.pipeline import read_inputs
    from shared.errors import DataError

    data, golden = tep_faults
    leaky = np.concatenate([tep_validation.x, data.x[:3]])
    files = {"train": (data.x, data.y), "validation": (leaky, np.concatenate(
        [tep_validation.y, data.y[:3]])), "golden": (golden.x, golden.y)}  # fmt: skip
    for name, (x, y) in files.items():
        np.savez(tmp_path / f"{name}.npz", x=x, y=y, class_names=np.array(CLASSES))
    (tmp_path / "teacher.safetensors").write_bytes(to_bytes(teachers["patchtst"], CLASSES))

    with pytest.raises(DataError, match="data and validation sets share windows"):
        read_inputs(
            teacher=tmp_path / "teacher.safetensors",
            data=tmp_path / "train.npz",
            validation=tmp_path / "validation.npz",
            golden=tmp_path / "golden.npz",
        )
