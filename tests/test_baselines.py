"""Baseline networks (DRBN, SNR-Net) with SKF on/off, their registry entries and reconstruction losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.baseline_losses import CharbonnierLoss, SSIMPyramidLoss, build_baseline_loss, ssim
from components.baselines import load_official_weights
from components.checkpoints import StateDictMismatchError
from components.registry import available, create
from models.drbn import DRBN
from models.se import SemanticEmbedding
from models.snr_net import MultiHeadSelfAttention, SNRNet, box_blur, snr_mask

torch.set_num_threads(1)

DRBN_SE = {"fuseblk_1": 26_812, "fuseblk_2": 7_238, "fuseblk_3": 7_414}
SNR_SE = {"att_block_3": 113_590, "att_block_2": 107_446, "att_block_1": 104_374}
# A transformer small enough for fast tests; SE blocks and all names are unaffected by it.
SNR_SMALL = {"n_layers": 1, "d_inner": 64}


def _ceil(size: int, k: int) -> int:
    return math.ceil(size / k)


def drbn_sem(b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """(F1 @1/8, F0 @1/4, Z @1/1) as the SKB returns them for an H×W image."""
    return (
        torch.randn(b, 96, _ceil(h, 8), _ceil(w, 8)),
        torch.randn(b, 48, _ceil(h, 4), _ceil(w, 4)),
        torch.randn(b, 59, h, w),
    )


def snr_sem(b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """(F0 @1/4, F1 @1/8, F2 @1/16)."""
    return (
        torch.randn(b, 48, _ceil(h, 4), _ceil(w, 4)),
        torch.randn(b, 96, _ceil(h, 8), _ceil(w, 8)),
        torch.randn(b, 192, _ceil(h, 16), _ceil(w, 16)),
    )


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def snr_official() -> SNRNet:
    torch.manual_seed(0)
    return SNRNet(skf=True)


# --------------------------------------------------------------------------------------------------
# DRBN
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(64, 64), (72, 88), (37, 50)])
@pytest.mark.parametrize("skf", [False, True])
def test_drbn_output_shapes_match_strided_targets(skf: bool, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    h, w = size
    model = DRBN(skf=skf).eval()
    y = torch.rand(2, 3, h, w)
    with torch.no_grad():
        out = model(torch.rand(2, 3, h, w), drbn_sem(2, h, w) if skf else None)
    assert [o.shape for o in out] == [y.shape, y[..., ::2, ::2].shape, y[..., ::4, ::4].shape]
    assert all(torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize("network", ["drbn", "snr-net"])
def test_channels_last_inside_gives_the_nchw_results_and_nchw_outputs(network: str) -> None:
    """The internal layout is a speed choice only: same outputs and gradients, NCHW-contiguous results."""
    h, w = 48, 40
    torch.manual_seed(0)
    if network == "drbn":
        fast, ref = DRBN(skf=True), DRBN(skf=True, channels_last=False)
        sem = drbn_sem(2, h, w)
    else:
        fast, ref = SNRNet(skf=True, **SNR_SMALL), SNRNet(skf=True, channels_last=False, **SNR_SMALL)
        sem = snr_sem(2, h, w)
    ref.load_state_dict(fast.state_dict())
    low = torch.rand(2, 3, h, w)
    outs = []
    for model in (fast, ref):
        out = model(low, sem) if network == "drbn" else (model(low, sem=sem),)
        assert all(o.is_contiguous() for o in out)
        sum(o.square().mean() for o in out).backward()
        outs.append((out, [p.grad for p in model.parameters() if p.requires_grad]))
    for a, b in zip(outs[0][0], outs[1][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("network", ["drbn", "snr-net"])
def test_channels_last_networks_stay_channels_last_through_every_conv_and_se_block(network: str) -> None:
    """Every conv and SE block of a channels-last network gets channels-last input: one NCHW stage (SNR's
    F.fold returns NCHW) would send the rest of the decoder down oneDNN's slower NCHW path and make each
    SE block pay layout copies in both passes."""
    h, w = 48, 40
    torch.manual_seed(0)
    if network == "drbn":
        model, sem = DRBN(skf=True, channels_last=True), drbn_sem(2, h, w)
    else:
        model, sem = SNRNet(skf=True, channels_last=True, **SNR_SMALL), snr_sem(2, h, w)
    nchw: list[str] = []

    def record(name: str):
        def hook(_module, args):
            x = args[0]
            if x.dim() == 4 and x.shape[1] > 3 and not x.is_contiguous(memory_format=torch.channels_last):
                nchw.append(name)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, SemanticEmbedding)):
            module.register_forward_pre_hook(record(name))
    with torch.no_grad():
        model(torch.rand(2, 3, h, w), sem) if network == "drbn" else model(torch.rand(2, 3, h, w), sem=sem)
    assert nchw == []


def test_drbn_skf_off_has_no_se_params_and_on_has_exactly_the_spec_counts() -> None:
    plain, skf = DRBN(skf=False), DRBN(skf=True)
    assert not any("fuseblk" in k for k in plain.state_dict())
    for name, count in DRBN_SE.items():
        assert n_params(getattr(skf.recur4, name)) == count
    assert n_params(skf) - n_params(plain) == sum(DRBN_SE.values())
    for r in ("recur1", "recur2", "recur3"):
        assert not hasattr(getattr(skf, r), "fuseblk_1")


def test_drbn_state_dict_names_follow_the_official_layout() -> None:
    """The expected keys are spelled out from the official DRBN_BU structure, not from our module."""
    expected: set[str] = set()
    for r in range(1, 5):
        p = f"recur{r}."
        for conv in ("SFENet1", "SFENet2", "Down1", "Down2", "Up1", "Up2"):
            expected |= {p + conv + ".weight", p + conv + ".bias"}
        for up in ("UPNet", "UPNet2", "UPNet4"):
            expected |= {f"{p}{up}.{i}.{t}" for i in (0, 1) for t in ("weight", "bias")}
        for j in range(6):
            expected |= {f"{p}RDBs.{j}.convs.{c}.conv.0.{t}" for c in range(4) for t in ("weight", "bias")}
            expected |= {f"{p}RDBs.{j}.LFF.weight", f"{p}RDBs.{j}.LFF.bias"}
    assert set(DRBN(skf=False).state_dict()) == expected
    sd = DRBN(skf=True).state_dict()
    se_keys = set(sd) - expected
    assert all(k.startswith(("recur4.fuseblk_1.", "recur4.fuseblk_2.", "recur4.fuseblk_3.")) for k in se_keys)
    for key, shape in {
        "recur4.fuseblk_1.attn.q.weight": (32, 32, 1, 1),
        "recur4.fuseblk_1.conv1.weight": (32, 96, 1, 1),
        "recur4.fuseblk_2.conv1.weight": (16, 48, 1, 1),
        "recur4.fuseblk_3.conv1.weight": (16, 59, 1, 1),
        "recur4.fuseblk_3.attn.temperature": (2, 1, 1),
        "recur4.fuseblk_1.norm1.body.weight": (32,),
        "recur4.fuseblk_1.ffn.project_in.weight": (170, 32, 1, 1),  # GDFN: 2 * int(32 * 2.66)
        "recur1.RDBs.2.convs.3.conv.0.weight": (16, 32 + 3 * 16, 3, 3),
        "recur1.Up2.weight": (32, 16, 4, 4),
        "recur1.UPNet4.0.weight": (16, 32, 3, 3),
        "recur1.SFENet1.weight": (16, 6, 3, 3),
    }.items():
        assert tuple(sd[key].shape) == shape, key


def test_drbn_official_format_checkpoint_loads_strictly(tmp_path) -> None:
    torch.manual_seed(1)
    source = DRBN(skf=True)
    path = tmp_path / "model_lol.pt"
    torch.save(source.state_dict(), path)
    target = DRBN(skf=True)
    assert load_official_weights(target, path) == len(source.state_dict())
    x = torch.rand(1, 3, 32, 32)
    sem = drbn_sem(1, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x, sem)[0], target(x, sem)[0])
    with pytest.raises(StateDictMismatchError, match="fuseblk"):
        load_official_weights(DRBN(skf=False), path)


def test_drbn_sem_callable_gets_the_recurrence3_image_and_gradients_reach_everything() -> None:
    torch.manual_seed(0)
    model = DRBN(skf=True)
    seen: list[torch.Tensor] = []

    def fake_skb(image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seen.append(image)
        f0 = image.mean(1, keepdim=True)[..., ::4, ::4].repeat(1, 48, 1, 1)
        f1 = image.mean(1, keepdim=True)[..., ::8, ::8].repeat(1, 96, 1, 1)
        z = image.mean(1, keepdim=True).repeat(1, 59, 1, 1)
        return f1, f0, z

    x = torch.rand(2, 3, 36, 44)
    y1, y2, y4 = model(x, fake_skb)
    assert seen[0].shape == x.shape
    (y1.mean() + y2.mean() + y4.mean()).backward()
    for name, p in model.named_parameters():
        if "fuseblk" in name or name.startswith("recur4."):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    se_grads = [p.grad.abs().sum() for n, p in model.named_parameters() if "fuseblk" in n]
    assert all(g > 0 for g in se_grads)
    # DRBN-SKF backpropagates through the priors into recurrences 1-3 (docs/method.md §2.5)
    assert model.recur1.SFENet1.weight.grad.abs().sum() > 0


def test_drbn_requires_priors_iff_built_with_skf() -> None:
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="skf=True"):
        DRBN(skf=True)(x)
    with pytest.raises(ValueError, match="no SE blocks"):
        DRBN(skf=False)(x, drbn_sem(1, 16, 16))


# --------------------------------------------------------------------------------------------------
# SNR-Net
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(64, 64), (72, 88), (30, 45)])
@pytest.mark.parametrize("skf", [False, True])
def test_snr_output_shape(skf: bool, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    h, w = size
    model = SNRNet(skf=skf, **SNR_SMALL).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, h, w), sem=snr_sem(2, h, w) if skf else None)
    assert out.shape == (2, 3, h, w) and torch.isfinite(out).all()


def test_snr_full_size_network_runs_and_has_exactly_the_spec_se_params(snr_official: SNRNet) -> None:
    with torch.no_grad():
        out = snr_official(torch.rand(1, 3, 48, 40), sem=snr_sem(1, 48, 40))
    assert out.shape == (1, 3, 48, 40)
    for name, count in SNR_SE.items():
        assert n_params(getattr(snr_official, name)) == count
    plain = SNRNet(skf=False, **SNR_SMALL)
    assert not any(k.startswith("att_block") for k in plain.state_dict())
    small_skf = SNRNet(skf=True, **SNR_SMALL)
    assert n_params(small_skf) - n_params(plain) == sum(SNR_SE.values())


def test_snr_state_dict_names_follow_the_official_layout(snr_official: SNRNet) -> None:
    expected: set[str] = set()
    for conv in ("conv_first_1", "conv_first_2", "conv_first_3", "upconv1", "upconv2", "HRconv", "conv_last"):
        expected |= {conv + ".weight", conv + ".bias"}
    for trunk, n in (("feature_extraction", 1), ("recon_trunk", 1), ("recon_trunk_light", 6)):
        expected |= {
            f"{trunk}.{i}.{c}.{t}" for i in range(n) for c in ("conv1", "conv2") for t in ("weight", "bias")
        }
    for i in range(6):
        p = f"transformer.layer_stack.{i}."
        expected |= {p + f"slf_attn.{n}.weight" for n in ("w_qs", "w_ks", "w_vs", "fc")}
        expected |= {p + "slf_attn.layer_norm.weight", p + "slf_attn.layer_norm.bias"}
        expected |= {p + f"pos_ffn.{n}.{t}" for n in ("w_1", "w_2", "layer_norm") for t in ("weight", "bias")}
    sd = snr_official.state_dict()
    assert {k for k in sd if not k.startswith("att_block_")} == expected
    for key, shape in {
        "att_block_3.attn.temperature": (2, 1, 1),
        "att_block_3.conv1.weight": (64, 192, 1, 1),
        "att_block_2.conv1.weight": (64, 96, 1, 1),
        "att_block_1.conv1.weight": (64, 48, 1, 1),
        "att_block_1.ffn.project_in_S.weight": (170, 64, 1, 1),
        "att_block_1.ffn.dwconv.weight": (340, 1, 3, 3),
        "transformer.layer_stack.0.slf_attn.w_qs.weight": (512, 1024),
        "transformer.layer_stack.5.pos_ffn.w_1.weight": (2048, 1024),
        "upconv1.weight": (256, 128, 3, 3),
        "HRconv.weight": (64, 128, 3, 3),
    }.items():
        assert tuple(sd[key].shape) == shape, key


def test_snr_official_format_checkpoint_with_module_prefix_loads_strictly(tmp_path) -> None:
    torch.manual_seed(2)
    source = SNRNet(skf=True, **SNR_SMALL)
    path = tmp_path / "SNR_SKF_LOL.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    target = SNRNet(skf=True, **SNR_SMALL)
    assert load_official_weights(target, path) == len(source.state_dict())
    x, sem = torch.rand(1, 3, 32, 32), snr_sem(1, 32, 32)
    with torch.no_grad():
        assert torch.equal(source.eval()(x, sem=sem), target.eval()(x, sem=sem))
    with pytest.raises(StateDictMismatchError, match="att_block"):
        load_official_weights(SNRNet(skf=False, **SNR_SMALL), path)


def test_snr_gradients_reach_the_se_params() -> None:
    torch.manual_seed(0)
    model = SNRNet(skf=True, **SNR_SMALL)
    model(torch.rand(2, 3, 32, 32), sem=snr_sem(2, 32, 32)).square().mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("att_block") and p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_snr_mask_blends_the_branches_the_right_way() -> None:
    """mask=1 (high SNR) uses only the local CNN branch; mask=0 only the transformer branch."""
    torch.manual_seed(0)
    model = SNRNet(skf=False, **SNR_SMALL).eval()
    x = torch.rand(1, 3, 32, 32)
    ones, zeros = torch.ones(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)
    with torch.no_grad():
        ref_local, ref_global = model(x, ones), model(x, zeros)
        for p in model.transformer.parameters():
            p.add_(0.5)
        assert torch.equal(model(x, ones), ref_local)
        assert not torch.allclose(model(x, zeros), ref_global)
        for p in model.recon_trunk_light.parameters():
            p.add_(0.5)
        assert not torch.allclose(model(x, ones), ref_local)


def test_masked_attention_attends_uniformly_when_every_key_is_masked() -> None:
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(d_model=32, heads=2, d_k=8, d_v=8)
    x = torch.randn(2, 5, 32)
    out = attn(x, keep=torch.zeros(2, 5, dtype=torch.bool))
    v = attn.w_vs(attn.layer_norm(x)).mean(dim=1, keepdim=True)  # uniform weights over all tokens
    assert torch.allclose(out, x + attn.fc(v).expand_as(x), atol=1e-6)
    keep = torch.tensor([[True, False, False, False, False]] * 2)
    only_first = attn(x, keep=keep)  # one attendable key: every query copies its value
    v0 = attn.w_vs(attn.layer_norm(x))[:, :1]
    assert torch.allclose(only_first, x + attn.fc(v0).expand_as(x), atol=1e-5)


def test_box_blur_matches_cv2_and_snr_mask_properties() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    img = rng.random((23, 31, 3)).astype(np.float32)
    ref = cv2.blur(img, (5, 5))
    ours = box_blur(torch.from_numpy(img).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)

    low = torch.rand(2, 3, 20, 24) * 0.2
    mask = snr_mask(low)
    assert mask.shape == (2, 1, 20, 24) and mask.min() >= 0 and mask.max() <= 1
    assert torch.allclose(mask.flatten(1).amax(1), torch.ones(2), atol=1e-3)  # normalised per image
    flat = torch.full((1, 3, 8, 8), 0.3)  # no noise anywhere: uniformly high SNR
    assert torch.allclose(snr_mask(flat), torch.ones(1, 1, 8, 8), atol=1e-3)
    with pytest.raises(ValueError, match="B×1×H×W"):
        SNRNet(skf=False, **SNR_SMALL)(low, torch.ones(2, 1, 10, 12))


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
def test_registry_builds_both_baselines_with_and_without_skf() -> None:
    assert {"baseline/drbn@1", "baseline/snr-net@1"} <= set(available("baseline"))
    assert any("fuseblk" in k for k in create("baseline/drbn", skf=True).state_dict())
    assert not any("fuseblk" in k for k in create("baseline/drbn@1", skf=False).state_dict())
    snr = create("baseline/snr-net@1", skf=False, **SNR_SMALL)
    assert isinstance(snr, SNRNet) and not snr.skf
    assert create("baseline/drbn@1", skf=False, g0=8).recur1.SFENet1.out_channels == 8


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
def _reference_ssim(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Naive per-pixel SSIM (zero padding, Gaussian window) in float64 numpy."""
    c1, c2 = 1e-4, 9e-4
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    pad = size // 2
    values = []
    for a, b in zip(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]), strict=True):
        ap, bp = np.pad(a, pad), np.pad(b, pad)
        wa = np.lib.stride_tricks.sliding_window_view(ap, (size, size))
        wb = np.lib.stride_tricks.sliding_window_view(bp, (size, size))
        mu_a, mu_b = (wa * win).sum((-2, -1)), (wb * win).sum((-2, -1))
        var_a = (wa**2 * win).sum((-2, -1)) - mu_a**2
        var_b = (wb**2 * win).sum((-2, -1)) - mu_b**2
        cov = (wa * wb * win).sum((-2, -1)) - mu_a * mu_b
        values.append(
            ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        )
    return float(np.mean(values))


def test_ssim_matches_a_naive_reference() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 17, 13, dtype=torch.float64)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert ssim(x, y).item() == pytest.approx(_reference_ssim(x.numpy(), y.numpy()), abs=1e-10)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_ssim_of_an_amp_prediction_against_an_fp32_target_runs_in_fp32(half: torch.dtype) -> None:
    """Under CUDA autocast DRBN's outputs are fp16/bf16 while the target stays fp32 (found on an H100)."""
    torch.manual_seed(0)
    y = torch.rand(2, 3, 24, 24)
    x = (y + 0.05 * torch.randn_like(y)).clamp(0, 1)
    pred = x.to(half).requires_grad_(True)
    value = SSIMPyramidLoss()([pred], y)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(-ssim(pred.detach().float(), y).item(), abs=1e-6)
    value.backward()
    assert pred.grad.dtype == half and torch.isfinite(pred.grad.float()).all()


def test_ssim_pyramid_is_minus_three_with_zero_finite_gradient_for_identical_images() -> None:
    loss = SSIMPyramidLoss()
    y = torch.rand(2, 3, 37, 50)
    outs = [y[..., ::s, ::s].clone().requires_grad_(True) for s in (1, 2, 4)]
    value = loss(outs, y)
    assert value.item() == pytest.approx(-3.0, abs=1e-6)
    value.backward()
    for o in outs:
        assert torch.isfinite(o.grad).all() and o.grad.abs().max() < 1e-6
    noisy = [(o.detach() + 0.1 * torch.randn_like(o)) for o in outs]
    assert loss(noisy, y).item() > -3.0
    with pytest.raises(ValueError, match="full, half, quarter"):
        loss([outs[0], outs[2]], y)


def test_charbonnier_is_summed_with_eps_1e6() -> None:
    loss = build_baseline_loss("charbonnier")
    assert isinstance(loss, CharbonnierLoss)
    y = torch.rand(2, 3, 8, 8)
    assert loss(y, y).item() == pytest.approx(y.numel() * 1e-3, rel=1e-5)
    assert loss(y + 1.0, y).item() == pytest.approx(y.numel() * math.sqrt(1 + 1e-6), rel=1e-5)
    with pytest.raises(ValueError, match="unknown baseline loss"):
        build_baseline_loss("l1")


# --------------------------------------------------------------------------------------------------
# Padding helpers
# --------------------------------------------------------------------------------------------------
def test_pad_to_multiple_and_fit_prior() -> None:
    from models.padding import fit_prior, pad_to_multiple

    x = torch.rand(1, 3, 32, 48)
    assert pad_to_multiple(x, 16) is x  # aligned inputs run exactly as released
    odd = torch.rand(1, 3, 30, 45)
    padded = pad_to_multiple(odd, 16)
    assert padded.shape[-2:] == (32, 48) and torch.equal(padded[..., :30, :45], odd)
    assert torch.equal(padded[..., 30, :45], odd[..., 28, :])  # reflect, not zeros
    assert pad_to_multiple(torch.rand(1, 3, 5, 5), 16).shape[-2:] == (16, 16)  # replicate fallback

    sem = torch.rand(1, 4, 8, 12)
    assert torch.equal(fit_prior(sem, (8, 12), (8, 12)), sem)
    low = torch.rand(1, 4, 2, 3)  # no padding: left at its resolution, the SE block resizes it itself
    assert fit_prior(low, (8, 12), (8, 12)) is low
    fitted = fit_prior(sem, (8, 12), (12, 16))
    assert fitted.shape[-2:] == (12, 16) and torch.equal(fitted[..., :8, :12], sem)
