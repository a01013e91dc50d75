"""The model package: canonical bytes, verification, named refusals."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import torch

from shared.errors import PackageError
from shared.package import ModelPackage


def test_same_model_packs_to_same_sha256(tiny_package):
    """Packaging the same model twice gives identical bytes, hence the same sha256."""
    from cloud.model.export import package_model

    pkg, model = tiny_package
    again = package_model(
        model,
        name="edgeloop.test.cpu-fp32",
        version="v1",
        parent=None,
        profile="cpu-fp32",
        class_names=list(ModelPackage(pkg).manifest.class_names),
        ood=ModelPackage(pkg).manifest.metadata["ood"],
    )
    assert ModelPackage(again).sha256 == ModelPackage(pkg).sha256


def test_onnx_matches_torch(tiny_package, tep_small):
    """ONNX Runtime on the package gives the PyTorch model's logits within 1e-4."""
    pkg, model = tiny_package
    _, golden = tep_small
    x = golden.x[:16]
    sess = ort.InferenceSession(ModelPackage(pkg).graph, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"window": x})[0]
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_manifest_records_every_tensor(tiny_package):
    """The manifest names a sha256 for every initializer in the graph."""
    import onnx

    pkg = ModelPackage(tiny_package[0])
    names = {t.name for t in onnx.load_from_string(pkg.graph).graph.initializer}
    assert names and set(pkg.manifest.tensor_sha256) == names


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda b: b[: len(b) // 2], "corrupt_package"),
        (lambda b: b"not a zip at all", "corrupt_package"),
        (lambda b: b[:-200] + bytes(200), "corrupt_package"),
    ],
)
def test_damaged_package_is_refused(tiny_package, damage, reason):
    """Truncated, foreign or overwritten packages raise PackageError with the reason."""
    with pytest.raises(PackageError) as err:
        ModelPackage(damage(tiny_package[0]))
    assert err.value.reason == reason


def test_tampered_graph_is_refused(tiny_package):
    """A graph whose bytes differ from the manifest's hash is refused as sha_mismatch."""
    src = zipfile.ZipFile(io.BytesIO(tiny_package[0]))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("manifest.json", src.read("manifest.json"))
        graph = bytearray(src.read("model.onnx"))
        graph[-10] ^= 0xFF
        zf.writestr("model.onnx", bytes(graph))
    with pytest.raises(PackageError) as err:
        ModelPackage(out.getvalue())
    assert err.value.reason == "sha_mismatch"


def test_expected_sha_is_checked(tiny_package):
    """A package that is not the one announced is refused before anything else."""
    with pytest.raises(PackageError) as err:
        ModelPackage(tiny_package[0], expected_sha256="0" * 64)
    assert err.value.reason == "sha_mismatch"


def _rezip(package: bytes, compression: int) -> bytes:
    """The package's two entries written again with ``compression``."""
    src = zipfile.ZipFile(io.BytesIO(package))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as zf:
        for name in ("manifest.json", "model.onnx"):
            zf.writestr(name, src.read(name))
    return out.getvalue()


def test_deflated_or_oversized_entries_are_refused_before_reading(tiny_package):
    """A deflated package, and one whose directory claims a manifest past its cap, are
    refused as corrupt_package; the stored rewrite of the same entries opens."""
    from shared.package import MAX_MANIFEST_BYTES

    pkg = tiny_package[0]
    assert ModelPackage(_rezip(pkg, zipfile.ZIP_STORED)).version == "v1"
    deflated = _rezip(pkg, zipfile.ZIP_DEFLATED)
    # The manifest's central-directory entry: sizes at offsets 20 (stored) and 24 (file).
    oversized = bytearray(pkg)
    entry = bytes(oversized).index(b"PK\x01\x02")
    for offset in (20, 24):
        oversized[entry + offset : entry + offset + 4] = (MAX_MANIFEST_BYTES + 1).to_bytes(
            4, "little"
        )
    for damaged in (deflated, bytes(oversized)):
        with pytest.raises(PackageError) as err:
            ModelPackage(damaged)
        assert err.value.reason == "corrupt_package"
