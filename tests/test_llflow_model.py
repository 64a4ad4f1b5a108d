"""LLFlow-S/L (``models/llflow.py``): released parameter layout, checkpoint loading, the flow's exactness.

The layouts in ``tests/data/llflow_keys`` were listed from the released code (see its README); a model
that matches them loads the released checkpoints strictly. The flow tests run a tiny float64 model so
that inverse and log-determinant can be checked to near machine precision.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from components.baselines.official import load_official_weights
from components.checkpoints import StateDictMismatchError
from models.llflow import (
    ActNorm,
    FlowEncoding,
    InvertibleConv1x1,
    LLFlow,
    LLFlowL,
    ZeroConv2d,
    equalize_histogram,
    llflow_input,
    nll_bits,
    squeeze2d,
    unsqueeze2d,
)
from tests.key_lists import Shape, mapping_diff, read_key_table

KEYS_DIR = Path(__file__).parent / "data" / "llflow_keys"


@dataclass(frozen=True)
class Variant:
    """A released network: how to build ours, its key-list file, and the counts that file must give."""

    name: str
    build: Callable[[], LLFlow]
    keys: int
    params: int


VARIANTS = [
    Variant("S-skf", lambda: LLFlow(skf=True), 457, 5_722_619),
    Variant("S-plain", lambda: LLFlow(skf=False), 412, 5_429_849),
    Variant("L-skf", lambda: LLFlowL(skf=True), 1573, 41_087_263),
    Variant("L-plain", lambda: LLFlowL(skf=False), 1516, 38_859_481),
]

#: Parameters the released code creates but never calls; checkpoints hold them, so the model must too.
RELEASED_UNUSED = (
    "flowUpsamplerNet.f.0.weight",
    "RRDB.downconv3.weight",
    "RRDB.HRconv.weight",
    "RRDB.conv_last.weight",
    "RRDB.awb_para.weight",
)


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def read_reference(name: str) -> dict[str, tuple[Shape, int]]:
    """``key -> (shape, numel)`` of the released ``llflow-<name>.tsv``."""
    return read_key_table(KEYS_DIR / f"llflow-{name}.tsv")


@functools.cache
def built_layout(variant: Variant) -> tuple[dict[str, Shape], int]:
    """Our model's ``key -> shape`` and parameter count; built once per variant (L has 41M parameters)."""
    model = variant.build()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes, sum(p.numel() for p in model.parameters())


def random_sem(batch: int, height: int, width: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """SKB outputs for an H×W image: F0 (48 ch) at 1/4, F1 (96) at 1/8, F2 (192) at 1/16 (at least 1×1)."""
    return tuple(  # type: ignore[return-value]
        torch.randn(batch, c, max(1, height // s), max(1, width // s), generator=gen, dtype=torch.float64)
        for c, s in ((48, 4), (96, 8), (192, 16))
    )


def random_image(batch: int, height: int, width: int, gen: torch.Generator) -> Tensor:
    return torch.rand(batch, 3, height, width, generator=gen, dtype=torch.float64)


@dataclass
class SmallFlow:
    """A tiny initialised float64 LLFlow-SKF in eval mode with the inputs it was checked on."""

    model: LLFlow
    low: Tensor
    lq: Tensor
    sem: tuple[Tensor, Tensor, Tensor]
    gt: Tensor


@pytest.fixture(scope="module")
def small_flow() -> SmallFlow:
    """Initialised as in training (data-dependent ActNorm), with non-zero last coupling layers.

    Freshly built, every coupling ends in a zero conv and is the identity, which would hide a wrong
    inverse or log-det; random small weights there make each coupling a genuine affine map.
    """
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    model = LLFlow(skf=True, nf=8, nb=2, flow_steps=2).double().train()
    low = random_image(2, 32, 48, gen)
    lq = llflow_input(low)
    sem = random_sem(2, 32, 48, gen)
    gt = random_image(2, 32, 48, gen)
    with torch.no_grad():
        model.encode(gt, model.conditions(lq, sem))
        for module in model.modules():
            if isinstance(module, ZeroConv2d):
                for p in (module.weight, module.bias, module.logs):
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return SmallFlow(model.eval(), low, lq, sem, gt)


# ---------------------------------------------------------------------------------------------------
# Released layout and checkpoints
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_state_dict_matches_released_layout(variant: Variant) -> None:
    """Same keys with the same shapes as the released network: its checkpoints load strictly."""
    reference = read_reference(variant.name)
    released = {k: shape for k, (shape, _) in reference.items()}
    ours, params = built_layout(variant)
    assert ours == released, "state dict differs from the released layout:\n" + mapping_diff(ours, released)
    assert len(ours) == variant.keys
    assert params == variant.params
    assert sum(math.prod(shape) for shape in ours.values()) == sum(n for _, n in reference.values())
    assert all(math.prod(shape) == n for shape, n in reference.values()), "TSV numel vs shape"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_released_unused_parameters_exist(variant: Variant) -> None:
    """The released code builds these and never calls them; a strict load needs them all the same."""
    ours, _ = built_layout(variant)
    assert [k for k in RELEASED_UNUSED if k not in ours] == []


def test_released_checkpoint_round_trip(tmp_path: Path) -> None:
    """A DataParallel-style checkpoint (``module.`` keys) loads strictly and bit-exactly."""
    gen = torch.Generator().manual_seed(7)
    state = {
        f"module.{k}": torch.randn(v.shape, generator=gen, dtype=v.dtype)
        for k, v in LLFlow(skf=True).state_dict().items()
    }
    path = tmp_path / "llflow_s_skf.pth"
    torch.save(state, path)

    model = LLFlow(skf=True)
    assert load_official_weights(model, path) == 457
    loaded = model.state_dict()
    assert loaded.keys() == {k.removeprefix("module.") for k in state}
    assert [k for k, v in loaded.items() if not torch.equal(v, state[f"module.{k}"])] == []


def test_wrong_size_checkpoint_names_every_mismatch(tmp_path: Path) -> None:
    """An S checkpoint into the L model: the error lists missing, unexpected and mis-shaped keys."""
    path = tmp_path / "llflow_s_skf.pth"
    torch.save({f"module.{k}": v for k, v in LLFlow(skf=True).state_dict().items()}, path)
    small = {k: shape for k, (shape, _) in read_reference("S-skf").items()}
    large = {k: shape for k, (shape, _) in read_reference("L-skf").items()}
    missing = sorted(large.keys() - small.keys())
    unexpected = sorted(small.keys() - large.keys())
    mismatched = sorted(
        f"{k} (checkpoint {small[k]} vs model {large[k]})"
        for k in small.keys() & large.keys()
        if small[k] != large[k]
    )
    assert (len(missing), len(unexpected), len(mismatched)) == (1137, 21, 229)

    with pytest.raises(StateDictMismatchError) as info:
        load_official_weights(LLFlowL(skf=True), path)

    err = info.value
    assert (err.missing, err.unexpected, err.mismatched) == (missing, unexpected, mismatched)
    assert "RRDB.conv_first.weight (checkpoint (32, 12, 3, 3) vs model (64, 12, 3, 3))" in mismatched
    message = str(err)
    assert message.startswith(f"state dict from {path} does not match the model")
    # Each list is shown as its count and first 20 keys, then how many more there are.
    for count, label, keys in (
        (1137, "missing", missing),
        (21, "unexpected", unexpected),
        (229, "shape mismatch", mismatched),
    ):
        assert f"{count} {label} key(s): " + ", ".join(keys[:20]) + f", ... ({count - 20} more)" in message
    assert message.endswith("check that the checkpoint belongs to this architecture/configuration")


# ---------------------------------------------------------------------------------------------------
# The flow is exactly invertible, with the right log-determinant
# ---------------------------------------------------------------------------------------------------
def test_decode_inverts_encode(small_flow: SmallFlow) -> None:
    model = small_flow.model
    with torch.no_grad():
        conds = model.conditions(small_flow.lq, small_flow.sem)
        z, logdet = model.encode(small_flow.gt, conds)
        back = model.decode(z, conds)
    assert z.shape == (2, 192, 4, 6)
    assert logdet.shape == (2,)
    assert (back - small_flow.gt).abs().max().item() < 1e-8


def test_encode_logdet_equals_jacobian_slogdet(small_flow: SmallFlow) -> None:
    """On an 8×8 image (192 inputs -> 192 latents) the summed log-dets equal log|det ∂z/∂x|."""
    model, gen = small_flow.model, torch.Generator().manual_seed(99)
    lq = llflow_input(random_image(1, 8, 8, gen))
    x = random_image(1, 8, 8, gen)
    with torch.no_grad():
        conds = model.conditions(lq, random_sem(1, 8, 8, gen))
        logdet = model.encode(x, conds)[1]

    def flow(flat: Tensor) -> Tensor:
        return model.encode(flat.view(1, 3, 8, 8), conds)[0].flatten()

    jacobian = torch.autograd.functional.jacobian(flow, x.flatten(), vectorize=True)
    assert jacobian.shape == (192, 192)
    sign, logabsdet = torch.linalg.slogdet(jacobian)
    assert sign.item() != 0
    assert logdet.item() == pytest.approx(logabsdet.item(), rel=1e-9, abs=1e-9)


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------
def channel_offsets(batch: int = 8, channels: int = 4, gen_seed: int = 0) -> Tensor:
    """Data whose channels have clearly different means and spreads (so an init is visible)."""
    gen = torch.Generator().manual_seed(gen_seed)
    scale = torch.tensor([0.5, 2.0, 3.0, 7.0])[:channels].view(1, -1, 1, 1)
    shift = torch.tensor([-1.0, 4.0, 0.0, 10.0])[:channels].view(1, -1, 1, 1)
    return torch.randn(batch, channels, 5, 6, generator=gen) * scale + shift


def test_actnorm_initialises_from_first_training_batch() -> None:
    norm = ActNorm(4).train()
    x = channel_offsets()
    y, logdet = norm(x, torch.zeros(x.shape[0]))
    assert norm.initialized
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    assert logdet is not None
    torch.testing.assert_close(logdet, torch.full((8,), norm.logs.sum().item() * 5 * 6))
    torch.testing.assert_close(norm(y, reverse=True)[0], x, atol=1e-5, rtol=1e-5)

    params = [p.detach().clone() for p in (norm.bias, norm.logs)]
    norm(channel_offsets(gen_seed=1))  # later batches do not re-initialise
    assert all(torch.equal(a, b) for a, b in zip(params, (norm.bias, norm.logs), strict=True))


def test_actnorm_skips_init_in_eval_mode() -> None:
    norm = ActNorm(4).eval()
    x = channel_offsets()
    assert torch.equal(norm(x)[0], x)
    assert not norm.initialized
    assert not norm.bias.any() and not norm.logs.any()


def test_actnorm_skips_init_when_bias_is_loaded() -> None:
    """A non-zero bias means trained (checkpoint) values, which the first training batch must keep."""
    norm = ActNorm(4).train()
    with torch.no_grad():
        norm.bias.fill_(0.25)
    x = channel_offsets()
    assert torch.equal(norm(x)[0], x + 0.25)
    assert norm.initialized
    assert torch.equal(norm.bias, torch.full((1, 4, 1, 1), 0.25)) and not norm.logs.any()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_invconv_reverse_inverts_forward(training: bool) -> None:
    torch.manual_seed(0)
    conv = InvertibleConv1x1(6).double().train(training)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    z, logdet = conv(x, torch.zeros(2, dtype=torch.float64))
    back, logdet_back = conv(z, logdet, reverse=True)
    torch.testing.assert_close(back, x, atol=1e-12, rtol=0)
    assert logdet is not None and logdet_back is not None
    expected = torch.linalg.slogdet(conv.weight)[1].item() * 3 * 4
    torch.testing.assert_close(logdet, torch.full((2,), expected, dtype=torch.float64))
    torch.testing.assert_close(logdet_back, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_invconv_loaded_weight_replaces_cached_inverse() -> None:
    """Outside training the inverse is cached; loading another weight must not reuse the stale one."""
    torch.manual_seed(0)
    conv = InvertibleConv1x1(6).double().eval()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        old = conv(x, reverse=True)[0]  # fills the cache
    new_weight = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    conv.load_state_dict({"weight": new_weight})
    with torch.no_grad():
        back = conv(x, reverse=True)[0]
    expected = F.conv2d(x, torch.linalg.inv(new_weight).view(6, 6, 1, 1))
    torch.testing.assert_close(back, expected, atol=1e-12, rtol=0)
    assert not torch.allclose(back, old)


def _random_levels(shape: Shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _constant_channel(shape: Shape) -> np.ndarray:
    image = _random_levels(shape)
    image[:, 1] = 93
    return image


def _few_levels(shape: Shape) -> np.ndarray:
    return np.array([3, 60, 61, 250], dtype=np.uint8)[np.random.default_rng(0).integers(0, 4, shape)]


def _halfway() -> np.ndarray:
    """1 pixel at level 0, 15 at 100, 35 at 200: level 100 maps to 255·15/50 = 76.5, which cv2 rounds to 76."""
    return np.array([0] + [100] * 15 + [200] * 35, dtype=np.uint8).reshape(1, 1, 1, 51)


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(_random_levels((2, 3, 7, 5)), id="random-7x5"),
        pytest.param(_random_levels((2, 3, 32, 48)), id="random-32x48"),
        pytest.param(_random_levels((1, 3, 97, 131)), id="random-97x131"),
        pytest.param(_constant_channel((2, 3, 16, 24)), id="constant-channel"),
        pytest.param(_few_levels((2, 3, 40, 30)), id="few-levels"),
        pytest.param(np.zeros((1, 3, 1, 1), np.uint8), id="single-pixel"),
        pytest.param(_halfway(), id="halfway-rounding"),  # float32 LUT arithmetic, as cv2
    ],
)
def test_equalize_histogram_matches_cv2(image: np.ndarray) -> None:
    """The released input uses cv2.equalizeHist on uint8 channels; ours must give the same levels."""
    ours = (equalize_histogram(torch.from_numpy(image).float() / 255) * 255).round().to(torch.uint8).numpy()
    expected = np.stack(
        [[cv2.equalizeHist(np.ascontiguousarray(channel)) for channel in sample] for sample in image]
    )
    assert ours.shape == image.shape
    wrong = np.argwhere(ours != expected)
    first = tuple(int(i) for i in wrong[0]) if len(wrong) else ()
    assert not len(wrong), f"{len(wrong)} pixels differ; at {first} ours {ours[first]}, cv2 {expected[first]}"


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_squeeze_round_trip_and_layout(factor: int) -> None:
    """Channel c·f² + fy·f + fx of the squeeze holds pixel (fy, fx) of each f×f block of channel c."""
    x = torch.arange(2 * 3 * 16 * 24, dtype=torch.float32).view(2, 3, 16, 24)
    squeezed = squeeze2d(x, factor)
    assert squeezed.shape == (2, 3 * factor**2, 16 // factor, 24 // factor)
    for c in range(3):
        for fy in range(factor):
            for fx in range(factor):
                channel = c * factor**2 + fy * factor + fx
                assert torch.equal(squeezed[:, channel], x[:, c, fy::factor, fx::factor])
    assert torch.equal(unsqueeze2d(squeezed, factor), x)


def test_squeeze_rejects_indivisible_size() -> None:
    with pytest.raises(ValueError, match=r"divisible by 2, got 5x6; pad the input"):
        squeeze2d(torch.zeros(1, 3, 5, 6))


def test_nll_bits_matches_gaussian_formula() -> None:
    gen = torch.Generator().manual_seed(3)
    z, mean = (torch.randn(2, 3, 8, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    logdet = torch.randn(2, generator=gen, dtype=torch.float64) * 50
    log_p = torch.distributions.Normal(mean, 1.0).log_prob(z).sum(dim=(1, 2, 3))
    expected = -(logdet + log_p) / (math.log(2.0) * 8 * 12)
    torch.testing.assert_close(nll_bits(z, mean, logdet), expected, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------
# The network's entry points
# ---------------------------------------------------------------------------------------------------
def test_conditions_reject_bad_inputs() -> None:
    """Wrong inputs fail early with the fix in the message, not deep inside a conv."""
    plain = LLFlow(nf=8, nb=2, flow_steps=1).eval()
    with pytest.raises(ValueError, match=r"6-channel input of llflow_input\(\), got 3 channels"):
        plain.conditions(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"divisible by 8, got 12x16; pad the input"):
        plain.conditions(torch.rand(1, 6, 12, 16))
    skf = LLFlow(skf=True, nf=8, nb=2, flow_steps=1).eval()
    with pytest.raises(ValueError, match=r"needs sem=\(F0, F1, F2\) from the SKB"):
        skf.conditions(torch.rand(1, 6, 16, 16))


def test_forward_decodes_colour_map_and_samples_with_heat(small_flow: SmallFlow) -> None:
    """Heat 0 is the released test (decode the colour map); heat > 0 samples, reproducibly per seed."""
    model, low, sem = small_flow.model, small_flow.low, small_flow.sem

    def sample(heat: float, seed: int) -> Tensor:
        out = model(low, sem, heat=heat, generator=torch.Generator().manual_seed(seed))
        assert isinstance(out, Tensor)
        return out

    with torch.no_grad():
        conds = model.conditions(small_flow.lq, sem)
        released = model.decode(model.mean_latent(conds), conds)
        assert released.shape == (2, 3, 32, 48)
        assert torch.equal(model(low, sem), released)
        assert torch.equal(sample(0.0, 5), released)
        hot = sample(0.8, 5)
        assert not torch.allclose(hot, released)
        assert torch.equal(sample(0.8, 5), hot)
        assert not torch.allclose(sample(0.8, 6), hot)


def test_forward_with_gt_encodes(small_flow: SmallFlow) -> None:
    """The training direction returns the GT's latent as an image-sized map, μ and the log-det."""
    model = small_flow.model
    with torch.no_grad():
        out = model(small_flow.low, small_flow.sem, gt=small_flow.gt)
        conds = model.conditions(small_flow.lq, small_flow.sem)
        latent, logdet = model.encode(small_flow.gt, conds)
    assert isinstance(out, FlowEncoding)
    assert torch.equal(out.z, unsqueeze2d(latent, 8))
    assert torch.equal(out.color_map, conds["color_map"])
    assert torch.equal(out.logdet, logdet)


def test_equalize_histogram_matches_cv2_on_many_few_level_images() -> None:
    """Few occupied levels make exact halves (k·255/n) common: the LUT arithmetic must round like cv2."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        levels = rng.choice(256, size=int(rng.integers(2, 6)), replace=False).astype(np.uint8)
        image = rng.choice(levels, size=(1, 3, int(rng.integers(3, 12)), int(rng.integers(3, 12))))
        ours = (
            (equalize_histogram(torch.from_numpy(image).float() / 255) * 255).round().to(torch.uint8).numpy()
        )
        expected = np.stack([cv2.equalizeHist(np.ascontiguousarray(ch)) for ch in image[0]])
        np.testing.assert_array_equal(ours[0], expected)


def test_inverse_follows_an_in_place_weight_update_outside_training() -> None:
    """An EMA copy into an eval-mode model changes the weight in place: the cached inverse must follow."""
    conv = InvertibleConv1x1(4).double().eval()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        conv(x, reverse=True)
        conv.weight.add_(0.1 * torch.randn(4, 4, dtype=torch.float64))
        assert (conv(conv(x)[0], reverse=True)[0] - x).abs().max() < 1e-10
