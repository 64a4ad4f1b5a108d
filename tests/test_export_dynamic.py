"""ONNX export with dynamic height and width: every family, plain and SKF, exported at one size runs in
onnxruntime at that size and at sizes it never saw, as eager PyTorch does (components/export.py)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from components.baselines import BaselineFamily, families, get_family
from components.inference import Enhancer, make_spec
from components.registry import create

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SKB = "skb/hrnet-w48-lite@1"
FAMILIES = families()
EXPORT_SIZE = (36, 44)
UNSEEN_SIZE = (52, 68)  # not a multiple of 32 (the SKB's pad) nor of 16 (SNR-Net, HWMNet, KinD)


@pytest.fixture(scope="module")
def skb() -> Any:
    torch.manual_seed(0)
    return create(SKB, device="cpu")


def _enhancer(family: BaselineFamily, skb: Any | None) -> Enhancer:
    torch.manual_seed(3)
    net = create(family.spec, skf=skb is not None, **family.smoke_model)
    spec = make_spec(family.spec, net, skb, baseline_kwargs=family.smoke_model)
    return Enhancer(net, skb, spec).eval()


def _export(enhancer: Enhancer, path: Path, layout: str = "nchw") -> tuple[Any, dict[str, str]]:
    from components.export import export_enhancer

    out = export_enhancer(enhancer, path, "onnx", height=EXPORT_SIZE[0], width=EXPORT_SIZE[1], layout=layout)  # type: ignore[arg-type]
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    return ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]), meta


def _max_error(enhancer: Enhancer, session: Any, size: tuple[int, int], layout: str = "nchw") -> float:
    from components.export import example_input

    x = example_input(*size)
    with torch.no_grad():
        expected = enhancer(x)
    if layout == "nhwc":
        x, expected = x.permute(0, 2, 3, 1).contiguous(), expected.permute(0, 2, 3, 1)
    (got,) = session.run(["enhanced"], {"image": x.numpy()})
    assert got.shape == tuple(expected.shape)
    return float(np.abs(got - expected.numpy()).max())


@pytest.mark.parametrize("skf", [False, True], ids=["plain", "skf"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_onnx_graph_runs_at_the_export_size_and_an_unseen_one(
    family: BaselineFamily, skf: bool, skb: Any, tmp_path: Path
) -> None:
    enhancer = _enhancer(family, skb if skf else None)
    session, meta = _export(enhancer, tmp_path / "enhancer.onnx")
    assert meta["skf.dynamic_shape"] == "true" and meta["skf.input_shape"] == "1x3xHxW"
    assert meta["skf.dynamic_axes"] == "height, width" and int(meta["skf.min_side"]) <= min(EXPORT_SIZE)
    dims = session.get_inputs()[0].shape
    assert dims[:2] == [1, 3] and all(isinstance(d, str) for d in dims[2:])  # symbolic H and W
    for size in (EXPORT_SIZE, UNSEEN_SIZE):
        assert _max_error(enhancer, session, size) < 1e-4, size


@pytest.mark.slow
@pytest.mark.parametrize("name", ["drbn", "hwmnet"])
def test_onnx_graph_exported_small_runs_at_400x600(name: str, skb: Any, tmp_path: Path) -> None:
    """(SNR-Net is not here: at 400×600 its graph matches one traced at 400×600 to 5e-7, but both differ from
    eager by ~4e-4 on one patch, where the mean SNR of a 4×4 patch sits at the attention mask's threshold
    and float rounding flips it -- a property of the network, not of the export.)"""
    enhancer = _enhancer(get_family(name), skb)
    session, _ = _export(enhancer, tmp_path / "enhancer.onnx")
    assert _max_error(enhancer, session, (400, 600)) < 1e-4


def test_nhwc_onnx_graph_has_dynamic_height_and_width(skb: Any, tmp_path: Path) -> None:
    enhancer = _enhancer(get_family("hwmnet"), skb)
    session, meta = _export(enhancer, tmp_path / "enhancer.onnx", layout="nhwc")
    assert meta["skf.input_layout"] == "NHWC" and meta["skf.input_shape"] == "1xHxWx3"
    for size in (EXPORT_SIZE, UNSEEN_SIZE):
        assert _max_error(enhancer, session, size, layout="nhwc") < 1e-4, size


def test_a_graph_that_fails_the_size_check_is_exported_for_its_size_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components import export

    monkeypatch.setattr(export, "_dynamic_error", lambda *args, **kwargs: float("inf"))
    enhancer = _enhancer(get_family("retinexnet"), None)
    with pytest.warns(RuntimeWarning, match="skf.dynamic_shape=false"):
        session, meta = _export(enhancer, tmp_path / "enhancer.onnx")
    assert meta["skf.dynamic_shape"] == "false" and meta["skf.input_shape"] == "1x3x36x44"
    assert "skf.min_side" not in meta and session.get_inputs()[0].shape == [1, 3, 36, 44]
    assert _max_error(enhancer, session, EXPORT_SIZE) < 1e-4
    assert not list(tmp_path.glob(".*.tmp"))


def test_sizes_below_the_smallest_padded_side_export_for_that_size(skb: Any, tmp_path: Path) -> None:
    from components.export import export_enhancer

    enhancer = _enhancer(get_family("retinexnet"), skb)  # the SKB pads to 32: a 20-pixel side cannot reflect
    out = export_enhancer(enhancer, tmp_path / "small.onnx", "onnx", height=20, width=40)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["skf.dynamic_shape"] == "false" and meta["skf.input_shape"] == "1x3x20x40"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert _max_error(enhancer, session, (20, 40)) < 1e-4


def test_floor_division_of_traced_sizes_is_exported_as_floor_division(tmp_path: Path) -> None:
    """The exporter on its own writes ``//`` as a truncating Div: ``-(-h // 8)`` (a ceil) came out wrong."""
    from components.export import ONNX_OPSET, _exact_floor_division

    class Ceil8(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.shape[-1]
            return x[..., : -(-n // 8) * 8 - n + 1]  # the pad to a multiple of 8, plus one column

    path = tmp_path / "ceil.onnx"
    with _exact_floor_division(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Ceil8(), (torch.rand(1, 100),), str(path), dynamo=False, input_names=["x"],
            dynamic_axes={"x": {1: "n"}}, opset_version=ONNX_OPSET,
        )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (100, 36, 52, 64):
        (got,) = session.run(None, {"x": np.zeros((1, n), np.float32)})
        assert got.shape == (1, (-n) % 8 + 1), n
