"""RetinexNet (models/retinexnet.py) and its losses (components/retinex_losses.py) against the official
TensorFlow ``model.py``: hand-counted parameters, TensorFlow 'same' padding and resizing, SE placement, the
sem contract, and the loss terms on hand-computed examples."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from components.retinex_losses import (
    RETINEX_DEFAULT_WEIGHTS,
    box_mean3,
    illumination_smoothness,
    image_gradient,
    retinex_decom_terms,
    retinex_relight_terms,
    rgb_to_gray,
)
from models.retinexnet import DecomNet, EnhanceNet, RetinexNet, SameConv2d, _resize_to, tf_same_padding
from models.se import SemanticEmbedding
from tests.priors_fixtures import PriorsLike

torch.set_num_threads(1)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv(cin: int, cout: int, k: int) -> int:
    """Weights + biases of a k×k ``tf.layers.conv2d`` (use_bias=True by default)."""
    return cin * cout * k * k + cout


# ---------------------------------------------------------------------------------------------------
# Parameter counts, by hand from the official layer definitions (channel=64, kernel_size=3, layer_num=5)
# ---------------------------------------------------------------------------------------------------
DECOM_PARAMS = (
    conv(4, 64, 9)  # shallow_feature_extraction: [max, R, G, B] -> 64, kernel_size * 3
    + 5 * conv(64, 64, 3)  # activated_layer_0..4
    + conv(64, 4, 3)  # recon_layer: -> R (3) + I (1)
)
ENHANCE_PARAMS = (
    conv(4, 64, 3)  # conv0: [R, G, B, I] -> 64
    + 3 * conv(64, 64, 3)  # conv1..conv3, stride 2
    + 3 * conv(64, 64, 3)  # deconv1..deconv3 (resize-conv)
    + conv(3 * 64, 64, 1)  # feature_fusion: concat of deconv1/2 resized and deconv3
    + conv(64, 1, 3)  # output: the adjusted illumination
)
SE_PARAMS = 93_494 + 96_566 + 102_710  # GDFN SE blocks for F0 (48), F1 (96), F2 (192) on 64 ch (test_se.py)


def test_parameter_counts_match_the_original():
    assert DECOM_PARAMS == 207_748 and ENHANCE_PARAMS == 236_865
    assert n_params(DecomNet()) == DECOM_PARAMS
    assert n_params(EnhanceNet()) == ENHANCE_PARAMS
    net = RetinexNet()
    assert n_params(net.decom) == DECOM_PARAMS and n_params(net.enhance) == ENHANCE_PARAMS
    assert n_params(net) == DECOM_PARAMS + ENHANCE_PARAMS


def test_skf_adds_exactly_the_se_blocks():
    plain, skf = RetinexNet(), RetinexNet(skf=True)
    build = partial(SemanticEmbedding, heads=2, ffn="gdfn", ffn_factor=2.66)
    blocks = sum(n_params(build(c, 64)) for c in (48, 96, 192))
    assert blocks == SE_PARAMS
    assert n_params(skf) - n_params(plain) == SE_PARAMS
    names = {n for n, _ in skf.named_children()}
    assert names == {"decom", "enhance"}
    se = {n for n, _ in skf.named_modules() if "att_block" in n and n.count(".") == 1}
    assert se == {"enhance.att_block_1", "enhance.att_block_2", "enhance.att_block_3"}
    assert not any("att_block" in n for n, _ in plain.named_modules())


# ---------------------------------------------------------------------------------------------------
# TensorFlow conventions
# ---------------------------------------------------------------------------------------------------
def test_tf_same_padding():
    assert tf_same_padding(8, 3, 2) == (0, 1)  # even size, stride 2: extra row at the bottom only
    assert tf_same_padding(7, 3, 2) == (1, 1)
    assert tf_same_padding(5, 9, 1) == (4, 4)
    assert tf_same_padding(5, 1, 1) == (0, 0)


def test_strided_conv_samples_like_tensorflow():
    torch.manual_seed(0)
    layer = SameConv2d(2, 3, 3, stride=2)
    for h, w in ((8, 6), (7, 5)):
        x = torch.randn(1, 2, h, w)
        top, bottom = tf_same_padding(h, 3, 2)
        left, right = tf_same_padding(w, 3, 2)
        ref = F.conv2d(F.pad(x, (left, right, top, bottom)), layer.weight, layer.bias, stride=2)
        out = layer(x)
        assert out.shape[-2:] == (math.ceil(h / 2), math.ceil(w / 2))
        torch.testing.assert_close(out, ref)
    # stride 1: zero padding, symmetric (not replicate, as some ports use)
    layer = SameConv2d(1, 1, 3)
    assert layer.padding == (1, 1) and layer.padding_mode == "zeros"


def test_nearest_resize_is_tensorflow_legacy():
    x = torch.arange(3.0).view(1, 1, 1, 3)
    like = torch.zeros(1, 1, 1, 5)
    # tf.image.resize_nearest_neighbor (align_corners=False): src = floor(dst * 3 / 5)
    assert _resize_to(x, like).flatten().tolist() == [0.0, 0.0, 1.0, 1.0, 2.0]


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def net() -> RetinexNet:
    torch.manual_seed(0)
    return RetinexNet().eval()


def test_forward_any_size_and_decomposition_ranges(net):
    low = torch.rand(2, 3, 37, 45)
    with torch.no_grad():
        out = net(low)
        R, I = net.decompose(low)  # noqa: E741
        delta = net.relight(R, I)
    assert out.shape == low.shape and torch.isfinite(out).all()
    assert R.shape == (2, 3, 37, 45) and I.shape == (2, 1, 37, 45)
    assert R.min() >= 0 and R.max() <= 1 and I.min() >= 0 and I.max() <= 1
    assert delta.shape == (2, 1, 37, 45)  # unpadded, like the original


def test_forward_is_r_low_times_delta_on_multiples_of_8(net):
    low = torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        R, I = net.decompose(low)  # noqa: E741
        expected = R * net.relight(R, I).repeat(1, 3, 1, 1)
        torch.testing.assert_close(net(low), expected)


def test_rejects_non_rgb(net):
    with pytest.raises(ValueError, match="B×3×H×W"):
        net(torch.rand(1, 1, 16, 16))


def _priors(b: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.rand(b, 48, math.ceil(h / 4), math.ceil(w / 4)),
        torch.rand(b, 96, math.ceil(h / 8), math.ceil(w / 8)),
        torch.rand(b, 192, math.ceil(h / 16), math.ceil(w / 16)),
    )


class _Recorder(torch.nn.Module):
    """Stand-in SE block: records (host, prior) shapes and returns the host unchanged."""

    def __init__(self, sem_channels: int, channels: int) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def forward(self, x: torch.Tensor, sem: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(x.shape), tuple(sem.shape)))
        return x


def test_se_blocks_sit_on_the_decoder_stages():
    torch.manual_seed(0)
    skf = RetinexNet(skf=True, se_factory=_Recorder).eval()
    plain = RetinexNet().eval()
    plain.load_state_dict(skf.state_dict())  # the recorders have no parameters
    low = torch.rand(1, 3, 37, 45)  # padded to 40×48
    with torch.no_grad():
        out = skf(low, _priors(1, 37, 45))
        torch.testing.assert_close(out, plain(low))  # identity blocks change nothing
    e = skf.enhance
    # conv3 at 1/8 = 5×6: F2 (3×3 of the 37×45 image) fitted to 5×6 (the SE block resizes ×2 as released)
    assert e.att_block_3.calls == [((1, 64, 5, 6), (1, 192, 3, 3))]
    assert e.att_block_2.calls == [((1, 64, 10, 12), (1, 96, 5, 6))]  # deconv1 at 1/4, F1 (1/8) as it is
    assert e.att_block_1.calls == [((1, 64, 20, 24), (1, 48, 20, 24))]  # deconv2 at 1/2, F0 fitted + padded


def test_se_output_feeds_the_next_stage():
    class Zero(_Recorder):
        def forward(self, x, sem):
            return torch.zeros_like(x)

    torch.manual_seed(0)
    enh = EnhanceNet(skf=True, se_factory=lambda cs, c: Zero(cs, c) if cs == 192 else _Recorder(cs, c))
    plain = EnhanceNet()
    plain.load_state_dict(enh.state_dict())
    R, I = torch.rand(1, 3, 16, 16), torch.rand(1, 1, 16, 16)  # noqa: E741
    with torch.no_grad():
        assert not torch.allclose(enh(R, I, _priors(1, 16, 16)), plain(R, I))


def test_skf_forward_with_real_se_blocks():
    torch.manual_seed(0)
    net = RetinexNet(skf=True).eval()
    low = torch.rand(1, 3, 37, 45)
    with torch.no_grad():
        out = net(low, _priors(1, 37, 45))
        R, I = net.decompose(low)  # noqa: E741
        delta = net.relight(R, I, _priors(1, 37, 45))
    assert out.shape == low.shape and torch.isfinite(out).all()
    assert delta.shape == (1, 1, 37, 45)


def test_sem_contract(net):
    low = torch.rand(1, 3, 16, 16)
    skf = RetinexNet(skf=True).eval()
    with pytest.raises(ValueError, match="skf=True"):
        skf(low)
    with pytest.raises(ValueError, match="skf=True"):
        skf.relight(torch.rand(1, 3, 16, 16), torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="skf=False"):
        net(low, _priors(1, 16, 16))
    with pytest.raises(ValueError, match="3 tensors|got 2"):
        skf(low, _priors(1, 16, 16)[:2])

    with pytest.raises(TypeError, match="Priors"):
        skf(low, PriorsLike())
    with pytest.raises(ValueError, match="sem"):
        EnhanceNet(skf=True)(torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 8))


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------
def test_default_weights_are_the_official_ones():
    assert RETINEX_DEFAULT_WEIGHTS == {
        "decom": {
            "recon_loss_low": 1.0,
            "recon_loss_high": 1.0,
            "recon_loss_mutual_low": 0.001,
            "recon_loss_mutual_high": 0.001,
            "equal_R_loss": 0.01,  # model.py: 0.01 * self.equal_R_loss
            "Ismooth_loss_low": 0.1,
            "Ismooth_loss_high": 0.1,
        },
        "relight": {"relight_loss": 1.0, "Ismooth_loss_delta": 3.0},
    }
    torch.manual_seed(0)
    t = [torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4), torch.rand(1, 1, 4, 4)]
    decom = retinex_decom_terms(t[0], t[1], t[2], t[3], t[2], t[3])
    assert set(decom) == set(RETINEX_DEFAULT_WEIGHTS["decom"])
    assert set(retinex_relight_terms(t[2], t[3], t[1])) == set(RETINEX_DEFAULT_WEIGHTS["relight"])


def test_perfect_decomposition_has_zero_reconstruction():
    torch.manual_seed(0)
    R, I = torch.rand(2, 3, 5, 6), torch.rand(2, 1, 5, 6)  # noqa: E741
    image = R * I.repeat(1, 3, 1, 1)
    terms = retinex_decom_terms(image, image, R, I, R, I)
    for name in ("recon_loss_low", "recon_loss_high", "recon_loss_mutual_low", "recon_loss_mutual_high"):
        assert terms[name] == 0, name
    assert terms["equal_R_loss"] == 0
    assert retinex_relight_terms(R, I, image)["relight_loss"] == 0


def test_reconstruction_terms_values():
    low, high = torch.full((1, 3, 2, 2), 0.2), torch.full((1, 3, 2, 2), 0.8)
    R_low, R_high = torch.full((1, 3, 2, 2), 0.5), torch.full((1, 3, 2, 2), 1.0)
    I_low, I_high = torch.full((1, 1, 2, 2), 0.4), torch.full((1, 1, 2, 2), 0.6)
    t = retinex_decom_terms(low, high, R_low, I_low, R_high, I_high)
    expected = {
        "recon_loss_low": abs(0.5 * 0.4 - 0.2),
        "recon_loss_high": abs(1.0 * 0.6 - 0.8),
        "recon_loss_mutual_low": abs(1.0 * 0.4 - 0.2),
        "recon_loss_mutual_high": abs(0.5 * 0.6 - 0.8),
        "equal_R_loss": 0.5,
    }
    for name, value in expected.items():
        assert t[name].item() == pytest.approx(value, abs=1e-6), name
    assert retinex_relight_terms(R_low, I_high, high)["relight_loss"].item() == pytest.approx(0.5, abs=1e-6)


def test_gray_uses_tensorflow_weights():
    rgb = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    assert rgb_to_gray(rgb).item() == pytest.approx(0.2989 + 2 * 0.5870 + 3 * 0.1140)


def test_gradient_kernels_on_a_3x3_example():
    x = torch.arange(9.0).view(1, 1, 3, 3)  # [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    # kernel [[0, 0], [-1, 1]], zero pad bottom/right: |x[i+1, j+1] - x[i+1, j]|
    assert image_gradient(x, "x").view(3, 3).tolist() == [[1, 1, 5], [1, 1, 8], [0, 0, 0]]
    # transposed kernel [[0, -1], [0, 1]]: |x[i+1, j+1] - x[i, j+1]|
    assert image_gradient(x, "y").view(3, 3).tolist() == [[3, 3, 0], [3, 3, 0], [7, 8, 0]]
    # 3×3 'same' average pooling leaves the padding out of the count
    ones = torch.ones(1, 1, 3, 3)
    torch.testing.assert_close(box_mean3(ones), ones)
    assert box_mean3(x)[0, 0, 0, 0].item() == pytest.approx((0 + 1 + 3 + 4) / 4)


def test_smoothness_hand_computed_2x2():
    I = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).view(1, 1, 2, 2)  # noqa: E741
    # R = 0: no reflectance edges, weights exp(0) = 1.
    # |∂x I| = [[|5-3|, |0-5|], [0, 0]], |∂y I| = [[|5-2|, 0], [|0-5|, 0]] -> (2 + 5 + 3 + 5) / 4
    R = torch.zeros(1, 3, 2, 2)
    assert illumination_smoothness(I, R).item() == pytest.approx(3.75)
    # grey R = 0.9999·g with g = [[0, 0], [0, 0.1]]: |∂x gray| and |∂y gray| each hold two 0.09999s; the
    # 3×3 mean of a 2×2 map averages all four pixels, so every weight is exp(-10 · 2·0.09999 / 4)
    R = torch.tensor([[0.0, 0.0], [0.0, 0.1]]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    weight = math.exp(-10 * 2 * 0.1 * 0.9999 / 4)
    assert illumination_smoothness(I, R).item() == pytest.approx(3.75 * weight, rel=1e-5)


def test_smoothness_of_constant_illumination_is_only_the_border_step():
    # zero 'same' padding makes the last column (x) and last row (y) step to 0: (H-1 + W-1) pixels of c
    c, h, w = 0.7, 4, 5
    I = torch.full((1, 1, h, w), c)  # noqa: E741
    R = torch.zeros(1, 3, h, w)
    assert illumination_smoothness(I, R).item() == pytest.approx(c * (h - 1 + w - 1) / (h * w))
    for d in ("x", "y"):
        assert image_gradient(I, d)[..., :-1, :-1].abs().max() == 0  # flat inside
    assert illumination_smoothness(torch.zeros(1, 1, h, w), torch.rand(1, 3, h, w)) == 0


def _smooth_reference(I: torch.Tensor, R: torch.Tensor) -> float:  # noqa: E741
    """The official ``smooth`` written out with loops on one image (TensorFlow 'same' semantics)."""
    h, w = I.shape[-2:]
    weights = (0.2989, 0.5870, 0.1140)
    gray = [[sum(wc * R[c, i, j].item() for c, wc in enumerate(weights)) for j in range(w)] for i in range(h)]
    img = [[I[0, i, j].item() for j in range(w)] for i in range(h)]

    def at(m, i, j):
        return m[i][j] if i < h and j < w else 0.0

    def grad(m, d):
        kx = {(1, 0): -1.0, (1, 1): 1.0}  # [[0, 0], [-1, 1]]
        k = kx if d == "x" else {(b, a): v for (a, b), v in kx.items()}
        return [
            [abs(sum(v * at(m, i + a, j + b) for (a, b), v in k.items())) for j in range(w)] for i in range(h)
        ]

    def avg(m):
        out = [[0.0] * w for _ in range(h)]
        for i in range(h):
            for j in range(w):
                cells = [
                    m[a][b]
                    for a in range(i - 1, i + 2)
                    for b in range(j - 1, j + 2)
                    if 0 <= a < h and 0 <= b < w
                ]
                out[i][j] = sum(cells) / len(cells)
        return out

    total = 0.0
    for d in ("x", "y"):
        gi, gr = grad(img, d), avg(grad(gray, d))
        total += sum(gi[i][j] * math.exp(-10 * gr[i][j]) for i in range(h) for j in range(w))
    return total / (h * w)


def test_smoothness_matches_a_loop_reference():
    torch.manual_seed(0)
    I, R = torch.rand(2, 1, 4, 5), torch.rand(2, 3, 4, 5)  # noqa: E741
    expected = sum(_smooth_reference(I[b], R[b]) for b in range(2)) / 2
    assert illumination_smoothness(I, R).item() == pytest.approx(expected, rel=1e-5)


def test_losses_backpropagate_finite_gradients():
    torch.manual_seed(0)
    net = RetinexNet()
    low, high = torch.rand(2, 3, 16, 16) * 0.2, torch.rand(2, 3, 16, 16)
    R_low, I_low = net.decompose(low)
    R_high, I_high = net.decompose(high)
    w = RETINEX_DEFAULT_WEIGHTS
    decom = retinex_decom_terms(low, high, R_low, I_low, R_high, I_high)
    sum(w["decom"][k] * v for k, v in decom.items()).backward()
    grads = [p.grad for p in net.decom.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in net.enhance.parameters())

    # phase 2: the decomposition is fixed (detached), only the Enhance-Net learns
    net.zero_grad(set_to_none=True)
    R_low, I_low = (t.detach() for t in net.decompose(low))
    relight = retinex_relight_terms(R_low, net.relight(R_low, I_low), high)
    sum(w["relight"][k] * v for k, v in relight.items()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.enhance.parameters())
    assert all(p.grad is None for p in net.decom.parameters())
