"""Hardened serving and evaluation: pixel limits before decoding, tiled enhancement, per-file skipping,
no overwriting of inputs, one-line errors for bad model references, clean temp folders, forced re-evaluation.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from serving_fixtures import make_enhancer

from components import model_registry as mr
from components import serving
from components.serving import (
    ImageTooLargeError,
    UnreadableImageError,
    enhance_arrays,
    enhance_image,
    read_image,
    tile_spans,
    write_image,
)
from components.tracking import experiment_name
from flows.cli import main

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_zeros(path: Path, width: int, height: int, *, complete: bool = True) -> Path:
    """A black RGB PNG streamed row by row: a few hundred KB on disk for ~width*height*3 bytes decoded.

    ``complete=False`` writes only the header and the first row (what a header-only check needs).
    """
    comp, row = zlib.compressobj(9), bytes(1 + 3 * width)
    rows = height if complete else 1
    idat = b"".join(comp.compress(row) for _ in range(rows)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``skf ARGS`` through the real entry point: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(args)
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code != 0, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in lines[0], lines[0]


class WindowSpy:
    """Wraps an enhancer's forward and records the (H, W) of every batch it is given."""

    def __init__(self, enhancer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[tuple[int, int]] = []
        forward = enhancer.forward

        def spy(x: torch.Tensor) -> torch.Tensor:
            self.sizes.append(tuple(x.shape[-2:]))
            return forward(x)

        monkeypatch.setattr(enhancer, "forward", spy)


# --------------------------------------------------------------------------------------------------
# Fixtures: one small registered model in a private SQLite registry
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def snr():
    return make_enhancer("baseline/snr-net@1", two_pass=True)


@pytest.fixture(scope="module")
def drbn_plain():
    return make_enhancer("baseline/drbn@1", skf=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, snr) -> dict[str, str]:
    """A SQLite tracking/registry store holding one registered version (no champion alias)."""
    root = tmp_path_factory.mktemp("hardening-mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient(uri)
        experiment = client.create_experiment("hardening", artifact_location=(root / "artifacts").as_uri())
        client.create_experiment(
            experiment_name()
        )  # what `skf evaluate` uses; created now so it logs nothing later
        run_id = client.create_run(experiment).info.run_id
        name = f"skf-hard-{uuid.uuid4().hex[:6]}"
        reg = mr.log_enhancer(
            snr, run_id=run_id, name=name, dataset_version="lol@1", protocol="raw", metrics={"psnr": 20.0},
            bundle_code=False,
        )  # fmt: skip
        local = root / "model-dir"
        mlflow.artifacts.download_artifacts(artifact_uri=reg.version_uri, dst_path=str(local))
    finally:
        mlflow.set_tracking_uri(None)
    return {"uri": uri, "name": name, "version": reg.version, "model_uri": reg.version_uri, "dir": str(local)}


@pytest.fixture()
def registry(
    store: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("SKF_HOME", str(tmp_path / "skf-home"))
    monkeypatch.delenv("SKF_CATALOG_URL", raising=False)
    mlflow.set_tracking_uri(store["uri"])
    try:
        yield store
    finally:
        mlflow.set_tracking_uri(None)


# --------------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "tile"), [(50, 64), (64, 64), (65, 64), (150, 64), (1500, 1024), (5000, 1000)]
)
def test_tile_spans_partition_the_axis_within_the_tile(size: int, tile: int) -> None:
    spans = tile_spans(size, tile)
    kept = [k for _, _, k0, k1 in spans for k in range(k0, k1)]
    assert kept == list(range(size))
    for w0, w1, k0, k1 in spans:
        assert w0 <= k0 < k1 <= w1 and w1 - w0 <= tile and w0 % 16 == 0 and k0 % 16 == 0
        if size > tile:  # every kept pixel has the margin as context, except at the image border
            assert (k0 - w0 >= 16 or w0 == 0) and (w1 - k1 >= 16 or w1 == size)


def test_tiled_output_equals_untiled_when_the_receptive_field_fits_the_margin(
    drbn_plain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain DRBN is convolutional with a receptive field under 32 px: tiles with a 32 px margin are exact."""
    rng = np.random.default_rng(3)
    image = rng.random((150, 230, 3), dtype=np.float32)
    whole = enhance_image(drbn_plain, image, tile=1024)
    spy = WindowSpy(drbn_plain, monkeypatch)
    tiled = enhance_image(drbn_plain, image, tile=128, margin=32)
    assert len(spy.sizes) > 1 and max(max(s) for s in spy.sizes) <= 128
    assert tiled.shape == image.shape and tiled.dtype == image.dtype
    np.testing.assert_allclose(tiled, whole, atol=1e-4)


def test_tiled_skf_output_keeps_shape_dtype_alpha_and_stays_close(
    snr, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SKF models see less context per tile (SKB, attention): close to untiled, never bigger than a tile."""
    rng = np.random.default_rng(4)
    rgba = rng.integers(0, 65536, (150, 200, 4), dtype=np.uint16)
    grey = rng.integers(0, 256, (130, 70), dtype=np.uint8)
    whole = enhance_image(snr, rgba, tile=1024)
    spy = WindowSpy(snr, monkeypatch)
    tiled = enhance_image(snr, rgba, tile=64)
    tiled_grey = enhance_image(snr, grey, tile=64)
    assert spy.sizes and max(max(s) for s in spy.sizes) <= 64
    assert tiled.shape == rgba.shape and tiled.dtype == np.uint16
    assert tiled_grey.shape == grey.shape and tiled_grey.dtype == np.uint8
    np.testing.assert_array_equal(tiled[..., 3], rgba[..., 3])
    diff = np.abs(tiled[..., :3].astype(np.float64) - whole[..., :3]) / 65535
    assert diff.mean() < 0.05


def test_enhance_arrays_tiles_images_larger_than_the_configured_tile(
    snr, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKF_ENHANCE_TILE", "64")
    spy = WindowSpy(snr, monkeypatch)
    small, large = np.zeros((32, 48, 3), np.uint8), np.zeros((100, 150, 3), np.uint8)
    outs = enhance_arrays(snr, [large, small])
    assert [o.shape for o in outs] == [large.shape, small.shape]
    assert max(max(s) for s in spy.sizes) <= 64


# --------------------------------------------------------------------------------------------------
# Pixel limits, checked from the header
# --------------------------------------------------------------------------------------------------
def test_read_image_refuses_an_image_over_the_limit_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cv2

    path = write_image(tmp_path / "wide.png", np.zeros((100, 200, 3), np.uint8))
    monkeypatch.setenv("SKF_MAX_ENHANCE_PIXELS", "10000")
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: pytest.fail("decoded an oversized image"))
    with pytest.raises(ImageTooLargeError) as refused:
        read_image(path)
    message = str(refused.value)
    assert str(path) in message and "200x100 = 20,000 pixels" in message
    assert "SKF_MAX_ENHANCE_PIXELS=10,000" in message and "\n" not in message


def test_a_header_beyond_pillows_bomb_limit_is_refused_by_our_limit(tmp_path: Path) -> None:
    bomb = png_of_zeros(tmp_path / "bomb.png", 20000, 20000, complete=False)
    with pytest.raises(ImageTooLargeError, match=r"400,000,000 pixels exceeds SKF_MAX_ENHANCE_PIXELS"):
        read_image(bomb)


@pytest.mark.parametrize(
    ("content", "name"),
    [(b"not an image at all", "text.png"), (b"", "empty.png"), (b"\x89PNG\r\n\x1a\n" + b"x" * 40, "bad.png")],
)
def test_unreadable_files_raise_one_clear_error(tmp_path: Path, content: bytes, name: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UnreadableImageError, match="not a readable image"):
        read_image(tmp_path / name)


def test_truncated_png_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    data = (
        write_image(tmp_path / "full.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    ).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match="cut.png"):
        read_image(tmp_path / "cut.png")


def test_a_small_file_decoding_to_gigabytes_is_refused_quickly_with_bounded_memory(tmp_path: Path) -> None:
    """9000x9000 black PNG (~240 KB): decoding it would take 243 MB (and 1 GB as float); it is refused."""
    bomb = png_of_zeros(tmp_path / "bomb.png", 9000, 9000)
    assert bomb.stat().st_size < 1_000_000
    probe = (
        "import resource, sys, time\n"
        "from components.serving import ImageTooLargeError, read_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "start = time.perf_counter()\n"
        "try:\n    read_image(sys.argv[1]); print('decoded')\n"
        "except ImageTooLargeError as exc:\n    print('refused', exc)\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(f'{time.perf_counter() - start:.3f} {grown // 1024}')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SKF_MAX_ENHANCE_PIXELS", None)
    done = subprocess.run(
        [sys.executable, "-c", probe, str(bomb)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines[0].startswith("refused"), done.stdout + done.stderr
    assert "9000x9000 = 81,000,000 pixels exceeds SKF_MAX_ENHANCE_PIXELS=50,000,000" in lines[0]
    seconds, grown_mb = lines[-1].split()
    assert float(seconds) < 2.0 and int(grown_mb) < 64, lines[-1]


# --------------------------------------------------------------------------------------------------
# skf enhance: batches skip bad files; inputs are never overwritten by accident
# --------------------------------------------------------------------------------------------------
def test_enhance_batch_skips_every_kind_of_bad_file_and_writes_the_rest(
    registry: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(5)
    write_image(src / "a-good.png", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    write_image(src / "z-good.png", rng.integers(0, 65536, (32, 32, 3), dtype=np.uint16))
    write_image(src / "explodes.png", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    png_of_zeros(src / "bomb.png", 20000, 20000, complete=False)
    full = write_image(tmp_path / "full.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).read_bytes()
    (src / "truncated.png").write_bytes(full[: len(full) // 2])
    (src / "text.jpg").write_text("not an image")
    original = serving.enhance_image

    def flaky(enhancer: Any, image: np.ndarray, **kw: Any) -> np.ndarray:
        if image.shape[:2] == (24, 24):
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(enhancer, image, **kw)

    monkeypatch.setattr(serving, "enhance_image", flaky)
    code, stdout, stderr = run_cli(["enhance", "-m", registry["model_uri"], str(src), str(out)], capsys)
    assert code == 0, stdout + stderr
    assert sorted(p.name for p in out.iterdir()) == ["a-good.png", "z-good.png"]
    assert "enhanced 2 of 6 image(s)" in stdout and "skipped 4" in stdout
    for name in ("bomb.png", "truncated.png", "text.jpg", "explodes.png"):
        assert name in stdout
    assert "SKF_MAX_ENHANCE_PIXELS" in stdout and "CUDA out of memory" in stdout
    assert "Traceback" not in stdout + stderr


def test_enhance_refuses_to_overwrite_the_inputs_unless_asked(
    registry: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "photos"
    src.mkdir()
    path = write_image(src / "a.png", np.random.default_rng(6).integers(0, 256, (32, 40, 3), dtype=np.uint8))
    before = path.read_bytes()
    for args in (["enhance", "-m", registry["model_uri"], str(src), str(src)],
                 ["enhance", "-m", registry["model_uri"], str(path), str(path)],
                 ["enhance", "-m", registry["model_uri"], str(path), str(src)]):  # fmt: skip
        code, out, err = run_cli(args, capsys)
        assert_one_line_error(code, out, err, "--overwrite", "a.png")
        assert path.read_bytes() == before
    code, out, err = run_cli(
        ["enhance", "-m", registry["model_uri"], str(src), str(src), "--overwrite"], capsys
    )
    assert code == 0 and "enhanced 1 of 1" in out, out + err
    assert path.read_bytes() != before and read_image(path).shape == (32, 40, 3)


# --------------------------------------------------------------------------------------------------
# One-line errors for bad model references
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["enhance", "-m", "models:/nope-model@champion", "{img}", "{out}"],
            ["no registered model 'nope-model'"],
        ),
        (
            ["enhance", "-m", "models:/{name}@champion", "{img}", "{out}"],
            ["no alias 'champion'", "skf promote"],
        ),
        (["enhance", "-m", "models:/{name}/99", "{img}", "{out}"], ["no version 99", "versions: {version}"]),
        (["enhance", "-m", "models:/{name}/latest-ish", "{img}", "{out}"], ["is not a number"]),
        (["enhance", "-m", "runs:/" + "0" * 32 + "/enhancer", "{img}", "{out}"], ["no MLflow run"]),
        (["enhance", "-m", "{tmp}/missing-model", "{img}", "{out}"], ["no such directory", "models:/"]),
        (["enhance", "-m", "{img}", "{img}", "{out}"], ["is a file, not a model directory"]),
        (["enhance", "-m", "{tmp}", "{img}", "{out}"], ["not an MLflow model directory"]),
        (["enhance", "-m", "{broken}", "{img}", "{out}"], ["cannot be loaded", "register the model again"]),
        (["export", "-m", "models:/nope-model/1", "-f", "torchscript", "{out}/m.pt"], ["nope-model"]),
        (
            ["export", "-m", "models:/{name}/1", "-f", "torchscript", "{out}/m.pt", "--height", "0"],
            ["--height"],
        ),
        (["promote", "nope-model", "1"], ["no registered model 'nope-model'", "registered: {name}"]),
        (["promote", "{name}", "99"], ["no version 99"]),
        (["evaluate", "models:/nope-model@champion", "lol@1"], ["no registered model 'nope-model'"]),
        (["evaluate", "models:/{name}@champion", "lol@1"], ["no alias 'champion'"]),
        (["evaluate", "0" * 32, "lol@1"], ["no model", "no MLflow run"]),
    ],
)
def test_bad_model_references_are_one_line_errors(
    registry: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    needles: list[str],
) -> None:
    img = write_image(tmp_path / "img.png", np.zeros((16, 16, 3), np.uint8))
    broken = Path(shutil.copytree(registry["dir"], tmp_path / "broken"))
    for weights in broken.rglob("enhancer.safetensors"):
        weights.write_bytes(b"\x00garbage")
    fields = {
        "img": str(img), "out": str(tmp_path / "out"), "tmp": str(tmp_path), "broken": str(broken),
        "name": registry["name"], "version": registry["version"],
    }  # fmt: skip
    code, out, err = run_cli([a.format(**fields) for a in args], capsys)
    assert_one_line_error(code, out, err, *(n.format(**fields) for n in needles))


# --------------------------------------------------------------------------------------------------
# skf evaluate: corrupt objects, temp folders, --force
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.pipeline_fixtures import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("hardening-data") / "data")


@pytest.fixture()
def evaluated_run(skf_home: Path, weights_dirs: dict[str, Path], tiny_source: Path) -> Iterator[str]:
    """A dataset tiny@1 and an MLflow run holding a small enhancer package (as training leaves it)."""
    from components.data.ingest import ingest
    from components.tracking import mlflow_client

    ingest(str(tiny_source), name="tiny", layout="lol")
    client = mlflow_client()
    run_id = client.create_run(client.get_experiment_by_name(experiment_name()).experiment_id).info.run_id
    mr.log_enhancer_package(make_enhancer("baseline/snr-net@1"), run_id)
    try:
        yield run_id
    finally:
        mlflow.set_tracking_uri(None)


def _private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_evaluate_leaves_no_temp_folders(
    evaluated_run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.evaluation.job import run_evaluation

    tmp = _private_tmp(tmp_path, monkeypatch)
    kwargs: dict[str, Any] = {"metrics": ["psnr"], "device": "cpu", "log": lambda _: None}
    first = run_evaluation(evaluated_run, "tiny@1", **kwargs)
    assert first["status"] == "evaluated" and "test/psnr" in first["metrics"]
    # Only fixed-name caches (torch's torchinductor_<user>) may appear, and only once.
    assert all(not name.startswith(("skf-", "tmp")) for name in os.listdir(tmp)), os.listdir(tmp)
    before = sorted(os.listdir(tmp))
    again = run_evaluation(evaluated_run, "tiny@1", force=True, **kwargs)
    assert again["status"] == "evaluated"
    assert sorted(os.listdir(tmp)) == before


def test_registered_model_loads_leave_no_temp_folders(
    registry: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = _private_tmp(tmp_path, monkeypatch)
    serving.load_enhancer(registry["model_uri"], device="cpu")
    assert os.listdir(tmp) == []


def test_evaluate_force_recomputes_a_cached_unavailable_metric(
    evaluated_run: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.evaluation import pyiqa_backend
    from components.evaluation.job import EVAL_TAG, run_evaluation
    from components.evaluation.metrics import MetricUnavailableError

    build = pyiqa_backend.build

    def no_ssim(spec: Any, device: Any) -> Any:
        if spec.name == "ssim":
            raise MetricUnavailableError("ssim", "weights missing (simulated)")
        return build(spec, device)

    kwargs: dict[str, Any] = {"metrics": ["psnr", "ssim"], "device": "cpu", "log": lambda _: None}
    monkeypatch.setattr(pyiqa_backend, "build", no_ssim)
    first = run_evaluation(evaluated_run, "tiny@1", **kwargs)
    assert "test/ssim" in first["unavailable"] and "test/ssim" not in first["metrics"]
    monkeypatch.setattr(pyiqa_backend, "build", build)  # the weights are "installed" now

    cached = run_evaluation(evaluated_run, "tiny@1", **kwargs)
    assert cached["status"] == "skipped" and "test/ssim" in cached["unavailable"]

    forced = run_evaluation(evaluated_run, "tiny@1", force=True, **kwargs)
    assert forced["status"] == "evaluated" and forced["unavailable"] == {}
    assert 0 < forced["metrics"]["test/ssim"] <= 1
    run = MlflowClient().get_run(evaluated_run)
    assert "eval/unavailable/ssim" not in run.data.tags
    assert run.data.metrics["test/ssim"] == pytest.approx(forced["metrics"]["test/ssim"])
    key = next(k for k in run.data.tags if k.startswith(EVAL_TAG))
    again = run_evaluation(evaluated_run, "tiny@1", **kwargs)
    assert again["status"] == "skipped" and again["unavailable"] == {} and key


def test_skf_evaluate_force_flag(evaluated_run: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["evaluate", evaluated_run, "tiny@1"], capsys)
    assert code == 0 and "(evaluated)" in out, out + err
    code, out, _ = run_cli(["evaluate", evaluated_run, "tiny@1"], capsys)
    assert code == 0 and "(skipped)" in out and "--force" in out
    code, out, err = run_cli(["evaluate", evaluated_run, "tiny@1", "--force"], capsys)
    assert code == 0 and "(evaluated)" in out, out + err


def test_evaluate_names_a_corrupt_dataset_object_in_one_line(
    evaluated_run: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from components.data.ingest import get_version

    low, _ = get_version("tiny@1").pairs("test")[0]
    obj = Path(low.uri)
    obj.chmod(obj.stat().st_mode | stat.S_IWUSR)
    obj.write_bytes(obj.read_bytes()[:-1] + b"\x00")
    code, out, err = run_cli(["evaluate", evaluated_run, "tiny@1"], capsys)
    assert_one_line_error(code, out, err, low.uri, "sha256", "re-ingest")
