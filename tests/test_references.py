"""Classic reference enhancers and the labelled sample grid: the rows and picture every evaluation carries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.evaluation.grid import labelled_grid
from components.evaluation.references import (
    GAMMA,
    REFERENCE_ENHANCERS,
    best_classic,
    enhance_references,
    headline,
    score_references,
)


def _dark(seed: int = 0, h: int = 40, w: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, h, w, generator=g) * 0.2).float()


def test_references_are_the_documented_curves_and_keep_shapes():
    low = _dark()
    outs = enhance_references([low, _dark(1, 32, 32)])
    assert list(outs) == list(REFERENCE_ENHANCERS) == ["input", "gamma", "clahe", "hist-eq"]
    for name, images in outs.items():
        assert [tuple(x.shape) for x in images] == [(3, 40, 48), (3, 32, 32)], name
        assert all(x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1 for x in images)
    torch.testing.assert_close(outs["input"][0], low)
    torch.testing.assert_close(outs["gamma"][0], low.pow(GAMMA), rtol=1e-5, atol=1e-6)
    # every enhancer brightens a dark image; histogram equalisation spreads the value channel over [0, 1]
    assert all(outs[n][0].mean() > low.mean() + 0.1 for n in ("gamma", "clahe", "hist-eq"))
    value = outs["hist-eq"][0].max(dim=0).values
    assert value.max() > 0.95 and value.min() < 0.05


def test_unknown_reference_is_refused():
    with pytest.raises(ValueError, match="unknown reference enhancer"):
        enhance_references([_dark()], names=["retinex"])


def test_scored_references_and_headline():
    high = [_dark(s).mul(4).clamp(0, 1) for s in range(3)]
    low = [h * 0.25 for h in high]  # an exact exposure change: gamma/CLAHE only approximate it
    reports = score_references(
        low, high, "raw", ("psnr", "ssim"), names=["a", "b", "c"], device=torch.device("cpu"), split="test"
    )
    scores = {n: r.aggregates for n, r in reports.items()}
    assert set(scores) == set(REFERENCE_ENHANCERS) and all(r.num_images == 3 for r in reports.values())
    name, value = best_classic(scores, "psnr")
    assert name != "input" and value == max(scores[n]["psnr"] for n in scores if n != "input")
    line = headline({"psnr": 30.0, "ssim": 0.9}, scores)
    assert (
        line.startswith("PSNR: model 30.00 dB vs input ")
        and f"({name})" in line
        and "SSIM: model 0.900" in line
    )
    lpips = {"input": {"lpips": 0.5}, "gamma": {"lpips": 0.3}, "clahe": {"lpips": 0.4}}
    assert best_classic(lpips, "lpips") == ("gamma", 0.3)  # lower is better for LPIPS
    with pytest.raises(ValueError, match="no classic reference"):
        best_classic({"input": {"psnr": 1.0}}, "psnr")


def test_labelled_grid_has_a_header_and_the_crops():
    rows = [(torch.zeros(3, 64, 80), torch.full((3, 64, 80), 0.5), torch.ones(3, 64, 80)) for _ in range(2)]
    grid = labelled_grid(rows, psnr_input=[8.1, 9.2], psnr_output=[20.3, None], size=48)
    array = np.asarray(grid)
    assert array.shape == (16 + 2 * 48, 3 * 48, 3)
    body = array[16:]
    assert body[40, 60].tolist() == [128, 128, 128] and body[40, 140].tolist() == [255, 255, 255]
    assert (array[:16, :48] > 200).any()  # the "input" header text
    # the PSNR labels: white text on the input crop; a black box with white text on the grey output crop
    assert (body[:14, 1:40] > 200).any()
    assert (body[:14, 49:90] < 10).any() and (body[:14, 49:90] > 200).any()
    assert (body[48 + 2 : 48 + 14, 49:90] == 128).all()  # no label where the PSNR is unknown
    with pytest.raises(ValueError, match="at least one"):
        labelled_grid([])
