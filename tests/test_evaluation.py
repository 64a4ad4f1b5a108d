"""Evaluation protocols and metrics: analytic values, skimage parity, GT-mean, unavailable metrics, NIQE, LPIPS."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from components import weights
from components.evaluation import evaluate_pairs, evaluate_unpaired, get_protocol

# pyiqa's published NIQE scores ("niqe(ours)" row of ResultsCalibra/calibration_summary.csv in the pyiqa
# repository) for the distorted calibration images its wheel installs under site-packages/ResultsCalibra/.
NIQE_CALIBRATION = {
    "I03.bmp": 15.6538,
    "I04.bmp": 3.6549,
    "I06.bmp": 3.2342,
    "I08.bmp": 3.1921,
    "I19.bmp": 9.0722,
}


def _random_uint8(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def _smooth_image(n: int = 2, h: int = 24, w: int = 28) -> torch.Tensor:
    """Images in [0.2, 0.7] with structure, so shifts and rescales never clip."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2])
    imgs = torch.stack([base.roll(i, dims=-1) for i in range(n)])
    return 0.2 + 0.5 * imgs


def test_identical_images_psnr_capped_or_inf_and_ssim_one(weights_dirs: dict[str, Path]) -> None:
    ref = _random_uint8(2, 16, 20, seed=1)
    raw = evaluate_pairs(ref, ref, "raw", ("psnr", "ssim"))
    # pyiqa psnr adds eps=1e-8 to the MSE: identical images score 10*log10(1/1e-8) = 80 dB, not inf.
    assert raw.aggregates["psnr"] == pytest.approx(80.0, abs=1e-6)
    assert raw.aggregates["ssim"] == pytest.approx(1.0, abs=1e-9)
    paper = evaluate_pairs(ref, ref, "paper", ("psnr", "ssim"))
    assert all(math.isinf(r["psnr"]) for r in paper.rows)  # skimage's behaviour, kept as is
    assert paper.aggregates["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert "test/psnr" not in paper.mlflow_metrics()
    assert paper.mlflow_tags()["test/psnr"] == "inf"


def test_constant_shift_gives_analytic_psnr(weights_dirs: dict[str, Path]) -> None:
    ref = _smooth_image()
    raw = evaluate_pairs(ref + 0.05, ref, "raw", ("psnr",))
    assert raw.aggregates["psnr"] == pytest.approx(-20 * math.log10(0.05), abs=1e-3)
    ref8 = (ref * 255).round().to(torch.uint8)
    paper = evaluate_pairs(ref8 + 5, ref8, "paper", ("psnr",))
    assert paper.aggregates["psnr"] == pytest.approx(20 * math.log10(255 / 5), abs=1e-9)


def test_paper_protocol_matches_skimage(weights_dirs: dict[str, Path]) -> None:
    out, ref = _random_uint8(3, 23, 31, seed=2), _random_uint8(3, 23, 31, seed=3)
    ref = ref // 2 + out // 2  # correlated, so SSIM is far from 0
    extra_out, extra_ref = _random_uint8(1, 17, 12, seed=4)[0], _random_uint8(1, 17, 12, seed=5)[0]
    report = evaluate_pairs(
        [*out.unbind(0), extra_out], [*ref.unbind(0), extra_ref], "paper", ("psnr", "ssim"), batch_size=2
    )
    pairs = [*zip(out.unbind(0), ref.unbind(0), strict=True), (extra_out, extra_ref)]
    assert len(report.rows) == 4
    for row, (o, r) in zip(report.rows, pairs, strict=True):
        o_np, r_np = o.permute(1, 2, 0).numpy(), r.permute(1, 2, 0).numpy()
        assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(r_np, o_np, data_range=255), abs=1e-4)
        expected = structural_similarity(r_np, o_np, channel_axis=-1, data_range=255)
        assert row["ssim"] == pytest.approx(expected, abs=1e-4)
    # Float inputs on the same 8-bit levels give the same numbers.
    again = evaluate_pairs(out.float() / 255, ref.float() / 255, "paper", ("psnr", "ssim"))
    assert [r["ssim"] for r in again.rows] == pytest.approx([r["ssim"] for r in report.rows[:3]], abs=1e-12)


def test_gt_mean_only_removes_the_brightness_scale(weights_dirs: dict[str, Path]) -> None:
    gt = _smooth_image()
    dark = 0.5 * gt
    assert evaluate_pairs(dark, gt, "raw", ("psnr",)).aggregates["psnr"] < 20
    fixed = evaluate_pairs(dark, gt, "gt-mean", ("psnr", "ssim"))
    assert fixed.aggregates["psnr"] == pytest.approx(80.0, abs=1e-3)  # perfect up to pyiqa's cap
    assert fixed.aggregates["ssim"] == pytest.approx(1.0, abs=1e-9)
    # A structurally different output scores the same at any exposure, but differently from perfect.
    other = gt.flip(-1) * 0.9
    a = evaluate_pairs(other, gt, "gt-mean", ("psnr", "ssim")).aggregates
    b = evaluate_pairs(other * 0.6, gt, "gt-mean", ("psnr", "ssim")).aggregates
    assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-3) and a["psnr"] < 40
    assert a["ssim"] == pytest.approx(b["ssim"], abs=1e-6)
    record = fixed.protocol.record()
    assert "mean_gray(GT)" in record["brightness"] and fixed.mlflow_params()["eval/protocol"] == "gt-mean"


def test_paper_gt_mean_truncates_with_swapped_gray_weights() -> None:
    proto = get_protocol("paper-gt-mean")
    gt = torch.tensor([0.8, 0.4, 0.2]).view(1, 3, 1, 1).expand(1, 3, 8, 8).contiguous()
    out = torch.tensor([0.2, 0.4, 0.8]).view(1, 3, 1, 1).expand(1, 3, 8, 8).contiguous()
    prepared, _ = proto.prepare(out, gt)
    gray = lambda x: 0.114 * x[0] + 0.587 * x[1] + 0.299 * x[2]  # noqa: E731 - cv2 BGR2GRAY on RGB data
    g_gt = gray([round(v * 255) / 255 for v in (0.8, 0.4, 0.2)])  # the GT is an 8-bit image
    mean_out = (0.2 + 0.4 + 0.8) / 3  # LLFlow's test.py: np.mean over the float output's RGB values
    expected = [math.floor(v * g_gt / mean_out * 255) for v in (0.2, 0.4, 0.8)]  # rescale, then truncate
    assert (prepared[0, :, 0, 0] * 255).round().tolist() == expected


def test_missing_weights_make_metrics_unavailable_not_zero(
    weights_dirs: dict[str, Path], unbundled: Path, tmp_path: Path
) -> None:
    out, ref = _random_uint8(2, 16, 16, seed=6), _random_uint8(2, 16, 16, seed=7)
    report = evaluate_pairs(out, ref, "raw")
    assert set(report.unavailable) == {"lpips", "niqe"}
    assert "LPIPS_v0.1_alex-df73285e.pth" in report.unavailable["lpips"].reason
    assert "niqe_modelparameters.mat" in report.unavailable["niqe"].reason
    assert str(weights_dirs["store"]) in report.unavailable["niqe"].reason
    assert report.aggregates["lpips"] is None and report.aggregates["niqe"] is None
    assert math.isfinite(report.aggregates["psnr"]) and 0 < report.aggregates["ssim"] < 1
    assert set(report.mlflow_metrics()) == {"test/psnr", "test/ssim", "test/num_images"}
    assert "niqe_modelparameters.mat" in report.mlflow_tags()["eval/unavailable/niqe"]
    assert "unavailable" in report.to_markdown() and "niqe_modelparameters.mat" in report.to_markdown()
    with report.to_csv(tmp_path / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["niqe"] == "" and rows[0]["protocol"] == "raw" and float(rows[0]["psnr"]) > 0
    unpaired = evaluate_unpaired(out)
    assert unpaired.aggregates == {"niqe": None} and "niqe" in unpaired.unavailable


def test_bad_inputs_raise_clear_errors(weights_dirs: dict[str, Path]) -> None:
    a, b = _random_uint8(1, 16, 16, seed=8), _random_uint8(1, 16, 18, seed=9)
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate_pairs(a, b, "paper", ("psnr",))
    with pytest.raises(ValueError, match="needs reference"):
        evaluate_unpaired(a, metrics=("psnr",))
    with pytest.raises(ValueError, match="cannot score unpaired"):
        evaluate_unpaired(a, "gt-mean")
    with pytest.raises(KeyError, match="known: raw"):
        evaluate_pairs(a, a, "nope", ("psnr",))


def test_niqe_reproduces_pyiqa_calibration(weights_dirs: dict[str, Path]) -> None:
    # Nothing in the store or the cache: the copy bundled with the package is verified and cached.
    assert not any(weights_dirs["store"].iterdir())
    site = Path(importlib.util.find_spec("pyiqa").origin).parents[1]
    images = [
        torch.from_numpy(np.array(Image.open(site / "ResultsCalibra" / "dist_dir" / n).convert("RGB")))
        .permute(2, 0, 1)
        .contiguous()
        for n in NIQE_CALIBRATION
    ]
    report = evaluate_unpaired(images, "raw", names=list(NIQE_CALIBRATION), device="cpu")
    assert not report.unavailable
    for row in report.rows:
        assert row["niqe"] == pytest.approx(NIQE_CALIBRATION[row["name"]], abs=0.01), row["name"]
    assert (weights_dirs["torch_home"] / "hub" / "pyiqa" / "niqe_modelparameters.mat").is_file()


def _pin_test_files(monkeypatch: pytest.MonkeyPatch, paths: list[Path]) -> None:
    """Pin test-made files in place of the published digests, which only the real files have."""
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    pinned = tuple(
        dataclasses.replace(s, sha256=digests.get(s.name, s.sha256)) for s in weights.KNOWN_WEIGHTS
    )
    monkeypatch.setattr(weights, "KNOWN_WEIGHTS", pinned)


def _write_random_lpips_weights(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch, lin_shape_ok: bool = True
) -> None:
    """A random AlexNet backbone and random LPIPS layers under the names pyiqa/torchvision look for."""
    from torchvision.models import alexnet

    torch.manual_seed(0)
    state = alexnet().state_dict()
    # The classifier is unused by LPIPS: store it as expanded zeros (one element on disk) to keep it small.
    state = {k: (v if k.startswith("features") else torch.zeros(1).expand(v.shape)) for k, v in state.items()}
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    channels = (64, 192, 384, 256, 256) if lin_shape_ok else (64, 192, 384, 256, 128)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(channels)}
    (torch_home / "hub" / "pyiqa").mkdir(parents=True)
    torch.save(lins, torch_home / "hub" / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth")
    _pin_test_files(
        monkeypatch,
        [
            torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth",
            torch_home / "hub" / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth",
        ],
    )


def test_lpips_loads_weights_from_the_cache(
    weights_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_random_lpips_weights(weights_dirs["torch_home"], monkeypatch)
    out, ref = _random_uint8(2, 64, 64, seed=10), _random_uint8(2, 64, 64, seed=11)
    report = evaluate_pairs(torch.cat([out, ref]), torch.cat([ref, ref]), "paper", ("lpips",), device="cpu")
    assert "lpips" not in report.unavailable
    values = [r["lpips"] for r in report.rows]
    assert all(math.isfinite(v) for v in values)
    assert values[0] > 0 and values[1] > 0
    assert values[2] == pytest.approx(0.0, abs=1e-6) and values[3] == pytest.approx(0.0, abs=1e-6)


def test_lpips_file_with_wrong_layers_is_unavailable(
    weights_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_random_lpips_weights(weights_dirs["torch_home"], monkeypatch, lin_shape_ok=False)
    out = _random_uint8(1, 32, 32, seed=12)
    report = evaluate_pairs(out, out, "raw", ("psnr", "lpips"))
    assert "lin4.model.1.weight" in report.unavailable["lpips"].reason
    assert report.aggregates["lpips"] is None and report.aggregates["psnr"] == pytest.approx(80.0)


def test_bundled_niqe_is_verified_before_use(
    weights_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components import weights

    status = {r.name: r for r in weights.weights_status()}["niqe_modelparameters.mat"]
    assert status.present and status.path == str(weights.BUNDLED_DIR / "niqe_modelparameters.mat")
    assert "bundled" in status.note and not status.refused
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / "niqe_modelparameters.mat").write_bytes(b"MATLAB 5.0 but not the published statistics")
    monkeypatch.setattr(weights, "BUNDLED_DIR", tampered)
    report = evaluate_unpaired(_random_uint8(1, 16, 16, seed=3))
    assert "niqe" in report.unavailable and "not the pinned" in report.unavailable["niqe"].reason
    assert not weights.cache_path("niqe_modelparameters.mat").exists()
