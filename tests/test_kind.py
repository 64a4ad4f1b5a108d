"""KinD / KinD++ (``models/kind.py``) and their losses (``components/kind_losses.py``).

Parameter counts are computed by hand from the layer definitions of the original TensorFlow code
(``zhangyhuaee/KinD`` ``model.py``; ``zhangyhuaee/KinD_plus`` ``model.py`` and ``msia_BN_3_M.py``): a
``slim.conv2d`` k×k from cin to cout has k·k·cin·cout weights + cout biases; ``upsample_and_concat``'s
transposed conv 2·2·cout·cin weights and no bias; BatchNorm 2·C trainable parameters (its moving averages
are TF non-trainable variables / PyTorch buffers).
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.baseline_losses import gaussian_window, ssim
from components.kind_losses import (
    KIND_DEFAULT_WEIGHTS,
    KINDPP_DEFAULT_WEIGHTS,
    TF_GRAY_WEIGHTS,
    kind_adjust_terms,
    kind_decom_terms,
    kind_gradient,
    kind_restore_target,
    kind_restore_terms,
    kind_ssim,
    kind_total,
    kindpp_adjust_terms,
    kindpp_restore_target,
    kindpp_restore_terms,
)
from models.kind import (
    KinD,
    KinDAdjustNet,
    KinDDecomNet,
    KinDPP,
    KinDPPRestorationNet,
    KinDRestorationNet,
    UpsampleConcat,
    illumination_ratio,
)
from models.se import SemanticEmbedding
from tests.priors_fixtures import PriorsLike


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def priors(batch: int, size: tuple[int, int]) -> list[Tensor]:
    """F0 (48 ch, 1/4), F1 (96 ch, 1/8), F2 (192 ch, 1/16) of an image of ``size``."""
    return [
        torch.rand(batch, c, math.ceil(size[0] / s), math.ceil(size[1] / s))
        for c, s in ((48, 4), (96, 8), (192, 16))
    ]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------
# Parameter counts, by hand from the original layer definitions
# ---------------------------------------------------------------------------------------------------
def test_decom_net_parameter_count_matches_original() -> None:
    expected = sum(
        [
            3 * 3 * 3 * 32 + 32,  # g_conv1_1: 3x3, 3 -> 32
            3 * 3 * 32 * 64 + 64,  # g_conv2_1: 3x3, 32 -> 64
            3 * 3 * 64 * 128 + 128,  # g_conv3_1: 3x3, 64 -> 128
            2 * 2 * 64 * 128,  # g_up_1: 2x2 transposed, 128 -> 64, no bias
            3 * 3 * 128 * 64 + 64,  # g_conv8_1: 3x3, 128 (up + conv2) -> 64
            2 * 2 * 32 * 64,  # g_up_2: 2x2 transposed, 64 -> 32, no bias
            3 * 3 * 64 * 32 + 32,  # g_conv9_1: 3x3, 64 (up + conv1) -> 32
            1 * 1 * 32 * 3 + 3,  # g_conv10: 1x1, 32 -> 3 (R)
            3 * 3 * 32 * 32 + 32,  # l_conv1_2: 3x3, 32 -> 32
            1 * 1 * 64 * 1 + 1,  # l_conv1_4: 1x1, 64 (l_conv1_2 + conv9) -> 1 (I)
        ]
    )
    assert expected == 235_876
    assert count(KinDDecomNet()) == expected


def test_restoration_net_parameter_count_matches_original() -> None:
    expected = sum(
        [
            3 * 3 * 4 * 32 + 32,  # de_conv1_1: 3x3, concat(R, I) 4 -> 32
            3 * 3 * 32 * 32 + 32,  # de_conv1_2
            3 * 3 * 32 * 64 + 64,  # de_conv2_1
            3 * 3 * 64 * 64 + 64,  # de_conv2_2
            3 * 3 * 64 * 128 + 128,  # de_conv3_1
            3 * 3 * 128 * 128 + 128,  # de_conv3_2
            3 * 3 * 128 * 256 + 256,  # de_conv4_1
            3 * 3 * 256 * 256 + 256,  # de_conv4_2
            3 * 3 * 256 * 512 + 512,  # de_conv5_1
            3 * 3 * 512 * 512 + 512,  # de_conv5_2
            2 * 2 * 256 * 512,  # up_6: 512 -> 256, no bias
            3 * 3 * 512 * 256 + 256,  # de_conv6_1
            3 * 3 * 256 * 256 + 256,  # de_conv6_2
            2 * 2 * 128 * 256,  # up_7: 256 -> 128
            3 * 3 * 256 * 128 + 128,  # de_conv7_1
            3 * 3 * 128 * 128 + 128,  # de_conv7_2
            2 * 2 * 64 * 128,  # up_8: 128 -> 64
            3 * 3 * 128 * 64 + 64,  # de_conv8_1
            3 * 3 * 64 * 64 + 64,  # de_conv8_2
            2 * 2 * 32 * 64,  # up_9: 64 -> 32
            3 * 3 * 64 * 32 + 32,  # de_conv9_1
            3 * 3 * 32 * 32 + 32,  # de_conv9_2
            3 * 3 * 32 * 3 + 3,  # de_conv10: 3x3, 32 -> 3
        ]
    )
    assert expected == 7_760_739
    assert count(KinDRestorationNet()) == expected


def test_adjust_net_parameter_count_matches_original() -> None:
    expected = sum(
        [
            3 * 3 * 2 * 32 + 32,  # en_conv_1: 3x3, concat(I, ratio) 2 -> 32
            3 * 3 * 32 * 32 + 32,  # en_conv_2
            3 * 3 * 32 * 32 + 32,  # en_conv_3
            3 * 3 * 32 * 1 + 1,  # en_conv_4: 3x3 (not 1x1), 32 -> 1
        ]
    )
    assert expected == 19_393
    assert count(KinDAdjustNet()) == expected


def msia_parameters(c: int) -> int:
    """``msia_3_M`` on a C-channel feature (msia_BN_3_M.py)."""
    return sum(
        [
            3 * 3 * 1 * 1,  # illu_attention_3_M/conv: 3x3, I 1 -> 1, use_bias=False
            3 * 3 * c * c + c,  # pu1/pu_conv: 3x3
            2 * c,  # pu1/batch_normalization: gamma, beta
            3 * 3 * c * c + c,  # pu2/pu_conv: 3x3 (after the 2x2 max-pool)
            2 * c,  # pu2/batch_normalization
            2 * 2 * c * c + c,  # pu2/conv_up: slim.conv2d_transpose 2x2 (with bias)
            1 * 1 * c * c + c,  # pu4/pu_conv: 1x1 (after the 4x4 max-pool)
            2 * c,  # pu4/batch_normalization
            2 * 2 * c * c + c,  # pu4/conv_up_1
            2 * 2 * c * c + c,  # pu4/conv_up
            1 * 1 * 4 * c * c + c,  # multi_scale_feature: 1x1, concat 4C -> C
        ]
    )


def test_kindpp_restoration_net_parameter_count_matches_original() -> None:
    expected = sum(
        [
            3 * 3 * 3 * 32 + 32,  # de_conv1_1: 3x3, R 3 -> 32
            3 * 3 * 32 * 64 + 64,  # de_conv1_2
            msia_parameters(64),  # msia on de_conv1
            3 * 3 * 64 * 128 + 128,  # de_conv2_1
            3 * 3 * 128 * 256 + 256,  # de_conv2_2
            msia_parameters(256),  # de_conv2
            3 * 3 * 256 * 512 + 512,  # de_conv3_1
            3 * 3 * 512 * 256 + 256,  # de_conv3_2
            msia_parameters(256),  # de_conv3
            3 * 3 * 256 * 128 + 128,  # de_conv4_1
            3 * 3 * 128 * 64 + 64,  # de_conv4_2
            msia_parameters(64),  # de_conv4
            3 * 3 * 64 * 32 + 32,  # de_conv5_1
            3 * 3 * 32 * 3 + 3,  # de_conv10
        ]
    )
    assert expected == 8_019_239
    net = KinDPPRestorationNet()
    assert count(net) == expected
    # moving averages are buffers, as they are TF non-trainable variables: three BatchNorms per MSIA, each
    # with a running mean and variance of C values
    running = sum(b.numel() for n, b in net.named_buffers() if "running" in n)
    assert running == 3 * 2 * (64 + 256 + 256 + 64)


def test_kindpp_reuses_kind_decomposition_and_adjustment() -> None:
    kind, kindpp = KinD(), KinDPP()
    assert type(kindpp.decom) is KinDDecomNet and type(kindpp.adjust) is KinDAdjustNet
    assert [n for n, _ in kindpp.decom.named_parameters()] == [n for n, _ in kind.decom.named_parameters()]
    assert count(kindpp) == count(kind.decom) + count(kindpp.restore) + count(kind.adjust)
    assert (KinD.stride, KinDPP.stride) == (16, 4)
    assert KinD.test_ratio == KinDPP.test_ratio == 5.0
    assert KinD.sem_inputs == KinDPP.sem_inputs == ("F0", "F1", "F2")


# ---------------------------------------------------------------------------------------------------
# SKF: SE blocks
# ---------------------------------------------------------------------------------------------------
SE_DEFAULT = partial(SemanticEmbedding, heads=2, ffn="gdfn", ffn_factor=2.66)
# host channels of (att_block_1, att_block_2, att_block_3)
HOST_CHANNELS = {KinD: (64, 128, 256), KinDPP: (32, 64, 128)}


@pytest.mark.parametrize("cls", [KinD, KinDPP])
def test_se_variant_adds_exactly_the_se_blocks(cls: type) -> None:
    plain, skf = cls(), cls(skf=True)
    blocks = [SE_DEFAULT(cs, c) for cs, c in zip((48, 96, 192), HOST_CHANNELS[cls], strict=True)]
    assert count(skf) - count(plain) == sum(count(b) for b in blocks)
    for k, block in enumerate(blocks, start=1):
        assert count(getattr(skf.restore, f"att_block_{k}")) == count(block)
    assert not any("att_block" in n for n, _ in plain.named_parameters())
    # a custom factory is used for every block
    built: list[tuple[int, int]] = []

    def factory(cs: int, c: int) -> nn.Module:
        built.append((cs, c))
        return SE_DEFAULT(cs, c)

    cls(skf=True, se_factory=factory)
    assert built == list(zip((48, 96, 192), HOST_CHANNELS[cls], strict=True))


def _record_se_io(model: nn.Module) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    seen: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for k in (1, 2, 3):
        block = getattr(model.restore, f"att_block_{k}")
        block.register_forward_hook(
            lambda _m, args, out, k=k: seen.__setitem__(f"att_block_{k}", (args[0], args[1], out))
        )
    return seen


def _record_io(module: nn.Module, store: dict, name: str) -> None:
    module.register_forward_hook(lambda _m, args, out: store.__setitem__(name, (args, out)))


def test_kind_se_blocks_sit_after_decoder_stages_at_claimed_scales() -> None:
    model = KinD(skf=True).eval()
    se = _record_se_io(model)
    layers: dict = {}
    for name in ("de_conv6_2", "de_conv7_2", "de_conv8_2", "up_7", "up_8", "up_9"):
        _record_io(getattr(model.restore, name), layers, name)
    h, w = 64, 80
    with torch.no_grad():
        model(torch.rand(1, 3, h, w), priors(1, (h, w)))
    lrelu = partial(F.leaky_relu, negative_slope=0.2)
    # host shapes: att_block_3 at 1/8 (256 ch), att_block_2 at 1/4 (128 ch), att_block_1 at 1/2 (64 ch)
    assert se["att_block_3"][0].shape == (1, 256, h // 8, w // 8)
    assert se["att_block_2"][0].shape == (1, 128, h // 4, w // 4)
    assert se["att_block_1"][0].shape == (1, 64, h // 2, w // 2)
    # each prior reaches its host by a ×2 upsampling (F2 1/16 -> 1/8, F1 1/8 -> 1/4, F0 1/4 -> 1/2)
    for k in (1, 2, 3):
        host, prior, _ = se[f"att_block_{k}"]
        assert host.shape[-1] == 2 * prior.shape[-1] and host.shape[-2] == 2 * prior.shape[-2]
    # each block takes its stage's final (activated) conv output and feeds the next upsampling
    for k, conv, nxt in (
        (3, "de_conv6_2", "up_7"),
        (2, "de_conv7_2", "up_8"),
        (1, "de_conv8_2", "up_9"),
    ):
        host, _, out = se[f"att_block_{k}"]
        torch.testing.assert_close(host, lrelu(layers[conv][1]))
        torch.testing.assert_close(layers[nxt][0][0], out)


def test_kindpp_se_blocks_sit_after_msia_stages_at_full_resolution() -> None:
    model = KinDPP(skf=True).eval()
    se = _record_se_io(model)
    layers: dict = {}
    for name in ("de_conv4_1", "de_conv4_2", "msia_4", "de_conv5_1", "de_conv10"):
        _record_io(getattr(model.restore, name), layers, name)
    h, w = 16, 20
    with torch.no_grad():
        model(torch.rand(1, 3, h, w), priors(1, (h, w)))
    assert se["att_block_3"][0].shape == (1, 128, h, w)
    assert se["att_block_2"][0].shape == (1, 64, h, w)
    assert se["att_block_1"][0].shape == (1, 32, h, w)
    # one block at each width of the narrowing half: after de_conv4_1 (128), msia_4 (64), de_conv5_1 (32)
    torch.testing.assert_close(se["att_block_3"][0], F.leaky_relu(layers["de_conv4_1"][1], 0.2))
    torch.testing.assert_close(layers["de_conv4_2"][0][0], se["att_block_3"][2])
    torch.testing.assert_close(se["att_block_2"][0], layers["msia_4"][1])
    torch.testing.assert_close(se["att_block_1"][0], F.leaky_relu(layers["de_conv5_1"][1], 0.2))
    torch.testing.assert_close(layers["de_conv10"][0][0], se["att_block_1"][2])


@pytest.mark.parametrize("cls", [KinD, KinDPP])
def test_sem_validation_as_in_snr_net(cls: type) -> None:
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="skf=True"):
        cls(skf=True)(x)
    with pytest.raises(ValueError, match="skf=False"):
        cls()(x, priors(1, (16, 16)))
    with pytest.raises(TypeError, match="Priors"):
        cls(skf=True)(x, PriorsLike())
    with pytest.raises(ValueError, match="got 2 tensors"):
        cls(skf=True)(x, priors(1, (16, 16))[:2])
    with pytest.raises(ValueError, match="B×3×H×W"):
        cls()(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="skf=True"):
        cls(skf=True).restore_reflectance(torch.rand(1, 3, 16, 16), torch.rand(1, 1, 16, 16))


# ---------------------------------------------------------------------------------------------------
# Shapes and pipeline
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "skf"), [(KinD, False), (KinD, True), (KinDPP, False), (KinDPP, True)])
def test_forward_any_size_returns_input_shape(cls: type, skf: bool) -> None:
    h, w = (37, 45) if cls is KinD or not skf else (21, 27)  # KinD++ runs 512 ch at full resolution
    b = 2 if cls is KinD else 1
    model = cls(skf=skf).eval()
    x = torch.rand(b, 3, h, w)
    with torch.no_grad():
        y = model(x, priors(b, (h, w)) if skf else None)
    assert y.shape == x.shape
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("cls", [KinD, KinDPP])
def test_decompose_gives_r_and_i_in_unit_range(cls: type) -> None:
    with torch.no_grad():
        r, i = cls().decompose(torch.rand(2, 3, 37, 45))
    assert r.shape == (2, 3, 37, 45) and i.shape == (2, 1, 37, 45)
    for t in (r, i):
        assert t.min() >= 0 and t.max() <= 1


def test_kind_subnets_run_unpadded_on_odd_sizes_like_tf_same() -> None:
    """TF's SAME pooling and output-shaped transposed convs accept any size; so do KinD's nets."""
    r, i = KinDDecomNet()(torch.rand(1, 3, 37, 45))
    assert r.shape == (1, 3, 37, 45) and i.shape == (1, 1, 37, 45)
    assert KinDRestorationNet()(r, i).shape == (1, 3, 37, 45)
    assert KinDAdjustNet()(i, torch.full_like(i, 5.0)).shape == (1, 1, 37, 45)
    with pytest.raises(ValueError, match="divisible by 4"):
        KinDPPRestorationNet()(torch.rand(1, 3, 10, 12), torch.rand(1, 1, 10, 12))


def test_upsample_concat_is_tf_conv2d_transpose_on_odd_sizes() -> None:
    """TF's conv2d_transpose(x, w, output_shape) is the gradient of the SAME stride-2 conv it transposes;
    for an odd side that conv pads one zero row/column at the bottom/right. Its VJP is the reference."""
    up = UpsampleConcat(6, 4)
    x, skip = torch.rand(2, 6, 4, 3), torch.rand(2, 4, 7, 5)  # skip 7×5 -> pooled ⌈7/2⌉×⌈5/2⌉ = 4×3
    y = torch.zeros_like(skip, requires_grad=True)
    forward = F.conv2d(F.pad(y, (0, 1, 0, 1)), up.weight, stride=2)  # TF SAME, k 2, s 2, odd input
    (reference,) = torch.autograd.grad(forward, y, grad_outputs=x)
    out = up(x, skip)
    torch.testing.assert_close(out[:, :4], reference)
    torch.testing.assert_close(out[:, 4:], skip)


@pytest.mark.parametrize("cls", [KinD, KinDPP])
def test_forward_is_r_hat_times_i_hat_with_test_ratio(cls: type) -> None:
    model = cls().eval()
    x = torch.rand(2, 3, *((32, 48) if cls is KinD else (16, 20)))  # multiples of the stride
    with torch.no_grad():
        r, i = model.decompose(x)
        expected = model.restore_reflectance(r, i) * model.adjust_illumination(i, 5.0)
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(
            model(x, ratio=2.0), model.restore_reflectance(r, i) * model.adjust_illumination(i, 2.0)
        )


def test_ratio_forms_broadcast_to_a_constant_map() -> None:
    model = KinD().eval()
    i = torch.rand(2, 1, 9, 11)
    with torch.no_grad():
        per_image = model.adjust_illumination(i, torch.tensor([2.0, 3.0]))
        torch.testing.assert_close(per_image[:1], model.adjust_illumination(i[:1], 2.0))
        torch.testing.assert_close(per_image[1:], model.adjust_illumination(i[1:], torch.tensor(3.0)))
        as_map = torch.tensor([2.0, 3.0]).view(2, 1, 1, 1).expand(2, 1, 9, 11)
        torch.testing.assert_close(model.adjust_illumination(i, as_map), per_image)
        torch.testing.assert_close(model.adjust_illumination(i), model.adjust_illumination(i, 5.0))
    with pytest.raises(ValueError, match="ratio"):
        model.adjust_illumination(i, torch.ones(3))


def test_illumination_ratio_is_the_per_image_mean_quotient() -> None:
    num = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 3.0]]]])
    den = torch.tensor([[[[1.0, 1.0]]], [[[0.5, 1.5]]]])
    expected = torch.tensor([(1 / 1.0001 + 2 / 1.0001) / 2, (3 / 0.5001 + 3 / 1.5001) / 2])
    torch.testing.assert_close(illumination_ratio(num, den), expected)


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------
# x = [[0, 1], [2, 4]] with TF SAME's zero row/column appended at the bottom/right:
#   ∂x[i, j] = x[i+1, j+1] − x[i+1, j]  -> [[4 − 2, 0 − 4], [0, 0]] = [[2, −4], [0, 0]]
#   ∂y[i, j] = x[i+1, j+1] − x[i, j+1]  -> [[4 − 1, 0 − 0], [0 − 4, 0]] = [[3, 0], [−4, 0]]
X = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
GX_ABS = [v / (4 + 1e-4) for v in (2, 4, 0, 0)]  # |∂x|, min 0, max 4
GY_ABS = [v / (4 + 1e-4) for v in (3, 0, 4, 0)]  # |∂y|, min 0, max 4
GX_SIGNED = [(v + 4) / (6 + 1e-4) for v in (2, -4, 0, 0)]  # ∂x, min −4, max 2
GY_SIGNED = [(v + 4) / (7 + 1e-4) for v in (3, 0, -4, 0)]  # ∂y, min −4, max 3


def flat(t: Tensor) -> list[float]:
    return t.flatten().tolist()


def test_gradient_operator_hand_values() -> None:
    assert flat(kind_gradient(X, "x")) == pytest.approx(GX_ABS)
    assert flat(kind_gradient(X, "y")) == pytest.approx(GY_ABS)
    assert flat(kind_gradient(X, "x", absolute=False)) == pytest.approx(GX_SIGNED)
    assert flat(kind_gradient(X, "y", absolute=False)) == pytest.approx(GY_SIGNED)
    # a flat map is not gradient-free: the zero border makes the last column (x) / row (y) jump by −0.7
    q = 0.7 / (0.7 + 1e-4)
    assert flat(kind_gradient(torch.full((1, 1, 3, 3), 0.7), "x")) == pytest.approx(
        [0, 0, q, 0, 0, q, 0, 0, 0]
    )
    assert flat(kind_gradient(torch.full((1, 1, 3, 3), 0.7), "y")) == pytest.approx(
        [0, 0, 0, 0, 0, 0, q, q, 0]
    )
    assert flat(kind_gradient(torch.zeros(1, 1, 3, 3), "x")) == [0.0] * 9


def test_gradient_normalises_over_the_whole_batch() -> None:
    batch = torch.cat((X, 2 * X))  # the second image's gradients are twice as large
    g = kind_gradient(batch, "x")
    assert flat(g[:1]) == pytest.approx([v * (4 + 1e-4) / (8 + 1e-4) for v in GX_ABS])
    with pytest.raises(ValueError, match="1-channel"):
        kind_gradient(torch.rand(1, 3, 4, 4), "x")


def test_decom_terms_vanish_for_a_consistent_decomposition() -> None:
    r = torch.rand(2, 3, 8, 8)
    i_low, i_high = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    terms = kind_decom_terms(r * i_low, r * i_high, r, i_low, r, i_high)
    assert set(terms) == set(KIND_DEFAULT_WEIGHTS["decom"]) == set(KINDPP_DEFAULT_WEIGHTS["decom"])
    for name in ("recon_low", "recon_high", "equal_r"):
        assert terms[name].item() == pytest.approx(0.0, abs=1e-7), name
    # the smoothness terms vanish only for a zero illumination (TF's zero border, see below)
    zero = torch.zeros(2, 1, 8, 8)
    terms = kind_decom_terms(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), r, zero, r, zero)
    for name in ("i_mutual", "i_input_mutual_low", "i_input_mutual_high"):
        assert terms[name].item() == 0.0, name


def test_decom_smoothness_terms_hand_values() -> None:
    black = torch.zeros(1, 3, 2, 2)  # gray gradients all 0 -> the 0.01 floor
    zeros = torch.zeros(1, 1, 2, 2)
    r = torch.full((1, 3, 2, 2), 0.5)
    terms = kind_decom_terms(black, black, r, X, r, zeros)
    mutual = sum(g * math.exp(-10 * g) for g in GX_ABS + GY_ABS) / 4  # I_high's gradients are all 0
    assert terms["i_mutual"].item() == pytest.approx(mutual, rel=1e-6)
    assert terms["i_input_mutual_low"].item() == pytest.approx(sum(GX_ABS + GY_ABS) / 0.01 / 4, rel=1e-6)
    assert terms["i_input_mutual_high"].item() == 0.0
    assert terms["recon_low"].item() == pytest.approx((0 + 0.5 + 1 + 2) / 4)  # |0.5·x − 0|, x = 0, 1, 2, 4
    assert terms["equal_r"].item() == 0.0
    # a flat illumination c on H×W: the zero border gives normalised gradient q = c / (c + 1e-4) on the
    # last column (x, H − 1 pixels above the corner) and the last row (y, W − 1 pixels)
    h, w, c = 3, 5, 0.4
    q = c / (c + 1e-4)
    black = torch.zeros(1, 3, h, w)
    flat_i, zero_i = torch.full((1, 1, h, w), c), torch.zeros(1, 1, h, w)
    terms = kind_decom_terms(black, black, torch.rand(1, 3, h, w), flat_i, torch.rand(1, 3, h, w), zero_i)
    assert terms["i_mutual"].item() == pytest.approx(
        (h - 1 + w - 1) * q * math.exp(-10 * q) / (h * w), rel=1e-5
    )
    assert terms["i_input_mutual_low"].item() == pytest.approx((h - 1 + w - 1) * q / 0.01 / (h * w), rel=1e-5)


def test_adjust_terms_hand_values() -> None:
    zeros = torch.zeros(1, 1, 2, 2)
    kind = kind_adjust_terms(X, zeros)
    assert kind["square"].item() == pytest.approx((0 + 1 + 4 + 16) / 4)
    assert kind["grad"].item() == pytest.approx(sum(g * g for g in GX_ABS + GY_ABS) / 4, rel=1e-6)
    kindpp = kindpp_adjust_terms(X, zeros)
    assert kindpp["grad"].item() == pytest.approx(sum(g * g for g in GX_SIGNED + GY_SIGNED) / 4, rel=1e-6)
    for terms in (kind_adjust_terms(X, X), kindpp_adjust_terms(X, X)):
        assert all(v.item() == 0.0 for v in terms.values())
    assert set(kind) == set(KIND_DEFAULT_WEIGHTS["adjust"]) and set(kindpp) == set(
        KINDPP_DEFAULT_WEIGHTS["adjust"]
    )


def test_restore_terms_hand_values_and_zero_for_identical() -> None:
    a = torch.rand(2, 3, 12, 13)
    for terms in (kind_restore_terms(a, a), kindpp_restore_terms(a, a)):
        for name, value in terms.items():
            assert value.item() == pytest.approx(0.0, abs=1e-6), name
    # gradient term: x in the top-left corner of an 11×11 zero image (SSIM's VALID window needs ≥ 11), in all
    # three channels: the zero rows/columns around it act like TF's SAME border, so the only non-zero
    # gradients are the 2×2 example's; gray = s·x with s = 0.2989 + 0.5870 + 0.1140 and the normaliser is
    # max·s + 1e-4, so each normalised value is the example's times s·(4 + 1e-4) / (4·s + 1e-4)
    s = sum(TF_GRAY_WEIGHTS)
    r_hat = torch.zeros(1, 3, 11, 11)
    r_hat[..., :2, :2] = X
    scale = s * (4 + 1e-4) / (4 * s + 1e-4)
    expected = sum((g * scale) ** 2 for g in GX_ABS + GY_ABS) / 121
    assert kind_restore_terms(r_hat, torch.zeros_like(r_hat))["grad"].item() == pytest.approx(
        expected, rel=1e-5
    )
    assert set(kind_restore_terms(a, a.flip(-1))) == set(KIND_DEFAULT_WEIGHTS["restore"])
    assert set(kindpp_restore_terms(a, a)) == set(KINDPP_DEFAULT_WEIGHTS["restore"])


def test_kind_ssim_uses_valid_windows_unlike_the_baseline_ssim() -> None:
    x, y = torch.rand(1, 2, 12, 13, dtype=torch.float64), torch.rand(1, 2, 12, 13, dtype=torch.float64)
    w = gaussian_window(11, 1.5, torch.float64)
    c1, c2 = 1e-4, 9e-4
    per_channel = []
    for c in range(2):
        values = []
        for i in range(12 - 10):  # VALID: 2 × 3 window positions
            for j in range(13 - 10):
                px, py = x[0, c, i : i + 11, j : j + 11], y[0, c, i : i + 11, j : j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * px * px).sum() - mx**2, (w * py * py).sum() - my**2
                cxy = (w * px * py).sum() - mx * my
                values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        per_channel.append(sum(values) / len(values))
    expected = sum(per_channel) / 2
    assert kind_ssim(x, y).item() == pytest.approx(expected.item(), rel=1e-10)
    assert abs(ssim(x, y).item() - expected.item()) > 1e-3  # zero-padded borders: a different value
    with pytest.raises(ValueError, match="VALID"):
        kind_ssim(torch.rand(1, 1, 10, 20), torch.rand(1, 1, 10, 20))


def test_losses_have_finite_gradients_even_on_flat_inputs() -> None:
    low, high = torch.rand(2, 3, 12, 12), torch.rand(2, 3, 12, 12)
    flat_i = torch.full((2, 1, 12, 12), 0.3, requires_grad=True)  # gradients 0: the 1e-4 denominators
    r_low = torch.rand(2, 3, 12, 12, requires_grad=True)
    i_low = torch.rand(2, 1, 12, 12, requires_grad=True)
    r_high = torch.rand(2, 3, 12, 12, requires_grad=True)
    totals = [
        kind_total(kind_decom_terms(low, high, r_low, i_low, r_high, flat_i), KIND_DEFAULT_WEIGHTS["decom"]),
        kind_total(kind_restore_terms(r_low, kind_restore_target(high)), KIND_DEFAULT_WEIGHTS["restore"]),
        kind_total(
            kindpp_restore_terms(r_low, kindpp_restore_target(high)), KINDPP_DEFAULT_WEIGHTS["restore"]
        ),
        kind_total(kind_adjust_terms(i_low, flat_i), KIND_DEFAULT_WEIGHTS["adjust"]),
        kind_total(kindpp_adjust_terms(flat_i, i_low), KINDPP_DEFAULT_WEIGHTS["adjust"]),
    ]
    for total in totals:
        for p in (r_low, i_low, r_high, flat_i):
            p.grad = None
        total.backward()
        assert torch.isfinite(total)
        for p in (r_low, i_low, r_high, flat_i):
            assert p.grad is None or torch.isfinite(p.grad).all()
    with pytest.raises(ValueError, match="different terms"):
        kind_total({"square": torch.tensor(1.0)}, KIND_DEFAULT_WEIGHTS["adjust"])


def test_default_weights_and_restore_targets_are_the_released_ones() -> None:
    assert (
        KIND_DEFAULT_WEIGHTS["decom"]["equal_r"] == 0.01
        and KINDPP_DEFAULT_WEIGHTS["decom"]["equal_r"] == 0.009
    )
    assert KIND_DEFAULT_WEIGHTS["decom"]["i_mutual"] == 0.2
    assert KIND_DEFAULT_WEIGHTS["decom"]["i_input_mutual_low"] == 0.15
    r = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(kind_restore_target(r), r**1.2)
    torch.testing.assert_close(kindpp_restore_target(r), (0.99 * r) ** 1.2)
    terms = {"square": torch.tensor(2.0), "grad": torch.tensor(3.0)}
    assert kind_total(terms, {"square": 1.0, "grad": 0.5}).item() == 3.5
