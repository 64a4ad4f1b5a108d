"""Serving: the Enhancer flows, array/bit-depth handling, ``skf enhance|export|promote`` and the register flow."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
import torch
import typer
from mlflow import MlflowClient
from serving_fixtures import TINY_SKB, make_enhancer, random_skb_checkpoint
from typer.testing import CliRunner

from components import model_registry as mr
from components.inference import (
    EnhancerSpec,
    EnhancerSpecError,
    build_enhancer,
    load_enhancer_dir,
    make_spec,
    save_enhancer,
)
from components.registry import create
from components.serving import enhance_arrays, enhance_batch, read_image, write_image
from flows.commands import serving as serving_cli


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A SQLite tracking/registry store with local artifacts, and a private SKF_HOME."""
    root = tmp_path_factory.mktemp("mlflow-local")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.setenv("SKF_HOME", str(root / "skf-home"))
        mp.delenv("SKF_CATALOG_URL", raising=False)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        client.create_experiment("serving-tests", artifact_location=(root / "artifacts").as_uri())
        try:
            yield root
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def snr():
    return make_enhancer("baseline/snr-net@1", two_pass=True)


def new_run(params: dict[str, str] | None = None) -> str:
    client = MlflowClient()
    run_id = client.create_run(client.get_experiment_by_name("serving-tests").experiment_id).info.run_id
    for k, v in (params or {}).items():
        client.log_param(run_id, k, v)
    return run_id


@pytest.fixture(scope="module")
def model_uri(tracking: Path, snr) -> str:
    name = f"skf-serving-{uuid.uuid4().hex[:6]}"
    reg = mr.log_enhancer(
        snr, run_id=new_run(), name=name, dataset_version="lol@1", protocol="raw", metrics={"psnr": 20.0}
    )
    return reg.version_uri


def reference(enhancer, image_float: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(image_float).permute(2, 0, 1)[None]
        return enhancer(x)[0].permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------------------------------
# Enhancer flows
# --------------------------------------------------------------------------------------------------
def test_snr_two_pass_runs_the_skb_on_the_first_output(snr, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    original = type(snr.skb).forward

    def spy(self, x, **kw):
        seen.append(x.detach().clone())
        return original(self, x, **kw)

    monkeypatch.setattr(type(snr.skb), "forward", spy)
    x = torch.rand(1, 3, 48, 80)
    with torch.no_grad():
        out = snr(x)
    assert len(seen) == 2 and torch.equal(seen[0], x)
    with torch.no_grad():
        first = snr.net(x, sem=snr.skb(x).features)
    assert torch.allclose(seen[1], first) and not torch.allclose(out, first.clamp(0, 1))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1


def test_drbn_segments_recurrence_three(monkeypatch: pytest.MonkeyPatch) -> None:
    drbn = make_enhancer("baseline/drbn@1")
    seen: list[torch.Tensor] = []
    original = type(drbn.skb).forward
    monkeypatch.setattr(
        type(drbn.skb), "forward", lambda self, x, **kw: seen.append(x) or original(self, x, **kw)
    )
    x = torch.rand(2, 3, 37, 50)  # not a multiple of 4: padding handled inside
    with torch.no_grad():
        out = drbn(x)
        r3 = drbn.net.forward_1(x).image
    assert out.shape == x.shape and len(seen) == 1 and torch.allclose(seen[0], r3)


def test_plain_baseline_has_no_skb_and_specs_round_trip(tmp_path: Path) -> None:
    plain = make_enhancer("baseline/snr-net@1", skf=False)
    assert plain.skb is None and plain.spec.skb is None
    save_enhancer(plain, tmp_path)
    assert not (tmp_path / "skb.safetensors").exists()
    x = torch.rand(1, 3, 20, 30)
    with torch.no_grad():
        assert torch.equal(load_enhancer_dir(tmp_path)(x), plain(x))
    assert EnhancerSpec.from_json(plain.spec.to_json()) == plain.spec


def test_rebuild_refuses_a_changed_skb(snr) -> None:
    net_state, skb_state = snr.state_dicts()
    other = EnhancerSpec.from_dict({**snr.spec.to_dict(), "skb_fingerprint": "0" * 64})
    with pytest.raises(EnhancerSpecError, match="fingerprint"):
        build_enhancer(other, net_state, skb_state)


def test_w18_small_skb_does_not_fit_the_se_blocks() -> None:
    net = create("baseline/drbn@1")
    skb = create("skb/hrnet-w18-small-test@1", device="cpu")
    spec = make_spec("baseline/drbn@1", net, skb)
    from components.inference import Enhancer

    with pytest.raises(EnhancerSpecError, match="48/96/192"):
        Enhancer(net, skb, spec)


def test_pretrained_flag_and_weights_survive_a_rebuild(tmp_path: Path) -> None:
    ckpt = random_skb_checkpoint(tmp_path / "skb.pt")
    e = make_enhancer("baseline/drbn@1", checkpoint=ckpt)
    assert e.pretrained_skb and e.spec.skb == TINY_SKB
    rebuilt = load_enhancer_dir(tmp_path / "pkg") if save_enhancer(e, tmp_path / "pkg") else None
    assert rebuilt.pretrained_skb and rebuilt.skb.fingerprint == e.skb.fingerprint


# --------------------------------------------------------------------------------------------------
# Arrays and files
# --------------------------------------------------------------------------------------------------
def test_enhance_arrays_keeps_dtype_shape_and_bit_depth(snr) -> None:
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    u16 = rng.integers(0, 65536, (64, 64, 3), dtype=np.uint16)
    f32 = rng.random((48, 80, 3), dtype=np.float32)
    grey = rng.integers(0, 256, (48, 80), dtype=np.uint8)
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    outs = enhance_arrays(snr, [u8, u16, f32, grey, rgba], batch_size=2)
    for src, out in zip([u8, u16, f32, grey, rgba], outs, strict=True):
        assert out.shape == src.shape and out.dtype == src.dtype
    np.testing.assert_array_equal(outs[4][..., 3], rgba[..., 3])  # alpha untouched
    expected16 = np.rint(reference(snr, u16.astype(np.float32) / 65535) * 65535).astype(np.uint16)
    assert np.abs(outs[1].astype(np.int64) - expected16).max() <= 1
    assert len(np.unique(outs[1])) > 256  # real 16-bit precision, not 8-bit scaled up
    np.testing.assert_allclose(outs[2], reference(snr, f32), atol=1e-6)
    np.testing.assert_allclose(enhance_batch(snr, f32[None])[0], outs[2], atol=1e-6)


def test_image_files_round_trip_with_bit_depth(tmp_path: Path) -> None:
    img = np.random.default_rng(1).integers(0, 65536, (10, 12, 3), dtype=np.uint16)
    write_image(tmp_path / "a.png", img)
    back = read_image(tmp_path / "a.png")
    assert back.dtype == np.uint16 and np.array_equal(back, img)
    assert np.array_equal(
        cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_UNCHANGED)[..., ::-1], img
    )  # RGB order


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def cli() -> typer.Typer:
    app = typer.Typer()
    serving_cli.register(app)
    return app


def test_skf_enhance_folder_skips_corrupt_files_and_keeps_names_and_depth(
    model_uri: str, snr, tmp_path: Path
) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(2)
    img8 = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    img16 = rng.integers(0, 65536, (48, 80, 3), dtype=np.uint16)
    write_image(src / "eight.png", img8)
    write_image(src / "sixteen.png", img16)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (src / "notes.txt").write_text("not an image")

    result = CliRunner().invoke(cli(), ["enhance", "--model", model_uri, str(src), str(out)])
    assert result.exit_code == 0, result.output
    assert (
        "broken.png" in result.output and "skipped 1" in result.output and "enhanced 2 of 3" in result.output
    )
    assert sorted(p.name for p in out.iterdir()) == ["eight.png", "sixteen.png"]
    got8, got16 = read_image(out / "eight.png"), read_image(out / "sixteen.png")
    assert got8.dtype == np.uint8 and got16.dtype == np.uint16 and got16.shape == (48, 80, 3)
    np.testing.assert_array_equal(got8, enhance_arrays(snr, [img8])[0])
    np.testing.assert_array_equal(got16, enhance_arrays(snr, [img16])[0])


def test_skf_enhance_fails_when_nothing_could_be_read(model_uri: str, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jpg").write_bytes(b"nope")
    result = CliRunner().invoke(
        cli(), ["enhance", "-m", model_uri, str(tmp_path / "in"), str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "x.jpg" in result.output


def test_torchscript_export_matches_pytorch(model_uri: str, snr, tmp_path: Path) -> None:
    out = tmp_path / "enhancer.pt"
    args = ["export", "-m", model_uri, "--format", "torchscript", str(out), "--height", "48", "--width", "80"]
    result = CliRunner().invoke(cli(), args)
    assert result.exit_code == 0, result.output
    scripted = torch.jit.load(str(out))
    x = torch.rand(1, 3, 48, 80)
    with torch.no_grad():
        np.testing.assert_allclose(scripted(x).numpy(), snr(x).numpy(), atol=1e-5)


def test_torchscript_nhwc_export_takes_and_returns_nhwc(model_uri: str, snr, tmp_path: Path) -> None:
    out = tmp_path / "enhancer-nhwc.pt"
    args = ["export", "-m", model_uri, "-f", "torchscript", str(out), "--height", "48", "--width", "80"]
    result = CliRunner().invoke(cli(), [*args, "--layout", "nhwc"])
    assert result.exit_code == 0 and "(1, 48, 80, 3) (NHWC)" in result.output, result.output
    x = torch.rand(1, 48, 80, 3)  # as decoded images and the pyfunc signature are laid out
    with torch.no_grad():
        got = torch.jit.load(str(out))(x)
        np.testing.assert_allclose(
            got.numpy(), snr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy(), atol=1e-5
        )
    bad = CliRunner().invoke(cli(), [*args, "--layout", "chw"])
    assert bad.exit_code == 2 and "expected one of nchw, nhwc" in bad.output


@pytest.mark.slow
def test_onnx_export_matches_pytorch_in_onnxruntime(model_uri: str, snr, tmp_path: Path) -> None:
    import json

    import onnx
    import onnxruntime as ort

    out = tmp_path / "snr.onnx"
    args = ["export", "-m", model_uri, "-f", "onnx", str(out), "--height", "32", "--width", "48"]
    result = CliRunner().invoke(cli(), [*args, "--layout", "nhwc"])
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape == [1, "height", "width", 3]  # any H, W (dynamic axes)
    for size in ((32, 48), (56, 72)):  # the export size, and one never seen at export
        x = torch.rand(1, *size, 3)
        (y,) = session.run(["enhanced"], {"image": x.numpy()})
        with torch.no_grad():
            expected = snr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        np.testing.assert_allclose(y, expected.numpy(), atol=1e-4)
    # the file says which model it is and how to feed it
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["skf.spec"])["baseline"] == snr.spec.baseline
    assert meta["skf.skb_fingerprint"] == (snr.spec.skb_fingerprint or "none")
    assert (meta["skf.input_layout"], meta["skf.input_shape"]) == ("NHWC", "1xHxWx3")
    assert (meta["skf.dynamic_shape"], meta["skf.dynamic_axes"]) == ("true", "height, width")
    assert meta["skf.input_range"] == "float32 RGB in [0, 1]"


def test_skf_promote_command(tracking: Path, tmp_path: Path) -> None:
    pretrained = make_enhancer("baseline/drbn@1", checkpoint=random_skb_checkpoint(tmp_path / "s.pt"))
    name = f"skf-cli-{uuid.uuid4().hex[:6]}"
    reg = mr.log_enhancer(
        pretrained, run_id=new_run(), name=name, dataset_version="lol@1", protocol="raw",
        metrics={"psnr": 20.0}, bundle_code=False,
    )  # fmt: skip
    result = CliRunner().invoke(cli(), ["promote", name, reg.version])
    assert result.exit_code == 0 and "promoted to champion" in result.output, result.output
    assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == reg.version


@pytest.mark.slow
def test_register_flow_registers_promotes_and_publishes_the_decision(
    tracking: Path, prefect_harness: None, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client

    from flows.register import register_model

    pretrained = make_enhancer("baseline/drbn@1", checkpoint=random_skb_checkpoint(tmp_path / "s.pt"))
    run_id = new_run({"dataset_version": "lol-flow@1", "eval/protocol": "paper"})
    MlflowClient().log_metric(run_id, "test/psnr", 19.0)
    mr.log_enhancer_package(pretrained, run_id)
    result = register_model(run_id)
    assert result["name"] == "skf-lol-flow" and result["decision"]["promoted"]
    tags = MlflowClient().get_model_version(result["name"], result["version"]).tags
    assert tags["skf.protocol"] == "paper" and tags["skf.metric.test/psnr"] == "19.0"

    import asyncio

    async def artifact() -> str:
        async with get_client() as client:
            found = await client.read_latest_artifacts()
            return next(a.data for a in found if a.key == "promotion-skf-lol-flow")

    assert "promoted to champion" in asyncio.run(artifact())
