"""SCH and SA losses: equality with a loop reference, invariances, gradients, AMP, region choice, compat."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import components.losses as losses_module
from components.losses import SemanticAdversarialLoss, SemanticColorHistogramLoss
from components.registry import create
from models.discriminator import Discriminator
from models.sch import sch_loss, soft_class_histograms

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------- SCH
def loop_reference(pred, target, labels, num_classes, normalizer, bins=256, sharpness=400.0):
    """Faithful slow SCH: loop over images x classes x channels, full 256-bin kernel, fp64."""
    n, c, h, w = pred.shape
    delta = 1.0 / bins
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) * delta

    def hist(values):
        t = values.double()[None, :] - centres[:, None]
        return (torch.sigmoid(sharpness * (t + delta / 2)) - torch.sigmoid(sharpness * (t - delta / 2))).sum(
            1
        )

    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        for k in range(num_classes):
            mask = labels[i] == k
            for ch in range(c):
                total = total + F.l1_loss(hist(pred[i, ch][mask]), hist(target[i, ch][mask]))
    z = n * h * w if normalizer == "nhw" else n * num_classes * h * w * c
    return total / z


def random_case(seed=0, n=2, size=16, classes=5):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(n, 3, size, size, generator=g)
    target = torch.rand(n, 3, size, size, generator=g)
    labels = torch.randint(0, classes, (n, size, size), generator=g)
    labels[:, 0, 0] = classes - 1
    return pred, target, labels


@pytest.mark.parametrize("normalizer", ["nhw", "nchw3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sch_equals_loop_reference(normalizer, seed):
    pred, target, labels = random_case(seed)
    labels[1][labels[1] == 2] = 3  # an empty class in one image
    got = sch_loss(pred, target, labels, num_classes=5, normalizer=normalizer)
    ref = loop_reference(pred, target, labels, 5, normalizer)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0.0)


def test_sch_equals_loop_reference_for_values_outside_unit_range():
    pred, target, labels = random_case(3)
    pred, target = pred * 3.0 - 1.0, target * 1.2 - 0.1  # like LLFlow's latent z vs its mean
    got = sch_loss(pred, target, labels, num_classes=5)
    torch.testing.assert_close(
        got.double(), loop_reference(pred, target, labels, 5, "nhw"), rtol=1e-5, atol=0.0
    )


@pytest.mark.parametrize(("bins", "sharpness"), [(256, 400.0), (32, 400.0), (8, 20.0)])
def test_sch_kernel_fit_matches_the_sigmoid_tails(bins, sharpness):
    """The fitted polynomials reproduce every signed tail on a dense grid of positions in the bin."""
    from models.sch import _DEGREE, _KernelFit

    window = 10
    fit = _KernelFit.fit(bins, sharpness, window)
    assert fit.cells == max(1, -(-sharpness / bins // (400.0 / 256.0)))  # steep kernels split the bin
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)[:-1]
    cell = (t * fit.cells).floor()
    v = t * fit.cells - cell - 0.5
    d = torch.arange(window + 1, -window - 1, -1, dtype=torch.float64)[:, None]
    slope = sharpness / bins
    exact = torch.where(d >= 1, torch.sigmoid(slope * (t - d)), -torch.sigmoid(slope * (d - t)))
    coef = fit.coefficients[:, :, cell.long()]  # (columns, degree+1, positions)
    approx = (coef * v ** torch.arange(_DEGREE + 1, dtype=torch.float64)[None, :, None]).sum(1)
    assert (approx - exact).abs().max() < 1e-8


def test_sch_equals_loop_reference_for_a_steep_kernel():
    # 32 bins at sharpness 400: each bin is split into 8 cells with their own polynomials.
    pred, target, labels = random_case(8)
    got = sch_loss(pred, target, labels, num_classes=5, bins=32)
    ref = loop_reference(pred, target, labels, 5, "nhw", bins=32)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0.0)
    p1 = pred.clone().requires_grad_(True)
    p2 = pred.double().clone().requires_grad_(True)
    sch_loss(p1, target, labels, num_classes=5, bins=32).backward()
    loop_reference(p2, target, labels, 5, "nhw", bins=32).backward()
    torch.testing.assert_close(p1.grad.double(), p2.grad, rtol=1e-4, atol=1e-7)


def test_histogram_mass_is_region_pixel_count():
    pred, _, labels = random_case(4)
    pred = pred.clamp(0.05, 0.95)  # away from the borders, where half a pixel's mass falls outside
    hist = soft_class_histograms(pred, labels, num_classes=5)
    counts = F.one_hot(labels.flatten(1), 5).sum(1).float()  # (N, K)
    torch.testing.assert_close(hist.sum(-1), counts[:, :, None].expand(-1, -1, 3), rtol=1e-5, atol=1e-4)


def test_sch_is_zero_for_identical_images_and_grows_with_a_class_confined_shift():
    pred, _, labels = random_case(5)
    pred = pred * 0.5 + 0.25
    assert sch_loss(pred, pred.clone(), labels, num_classes=5).item() == 0.0
    mask = (labels == 2).unsqueeze(1)
    shift = torch.tensor([0.1, -0.05, 0.0]).view(1, 3, 1, 1)
    losses = [sch_loss(pred + mask * shift * s, pred, labels, num_classes=5).item() for s in (0.1, 0.5, 1.0)]
    assert 0 < losses[0] < losses[1] < losses[2]
    # The shift only touches class 2: every other class keeps its histogram.
    diff = soft_class_histograms(pred + mask * shift, labels, 5) - soft_class_histograms(pred, labels, 5)
    per_class = diff.abs().sum(dim=(0, 2, 3))
    assert per_class[2] > 1.0
    assert per_class[[0, 1, 3, 4]].max() == 0.0


def test_sch_gradient_reaches_pred_only_through_values():
    pred, target, labels = random_case(6)
    pred.requires_grad_(True)
    loss = SemanticColorHistogramLoss(num_classes=5)(pred, target, labels)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_sch_gradient_matches_loop_reference():
    pred, target, labels = random_case(7, size=8, classes=3)
    p1 = pred.clone().requires_grad_(True)
    p2 = pred.double().clone().requires_grad_(True)
    sch_loss(p1, target, labels, num_classes=3).backward()
    loop_reference(p2, target, labels, 3, "nhw").backward()
    torch.testing.assert_close(p1.grad.double(), p2.grad, rtol=1e-4, atol=1e-7)


def test_sch_histogram_backward_passes_gradcheck():
    # A window wider than the bin range makes the histogram smooth everywhere (no truncation seams).
    g = torch.Generator().manual_seed(11)
    x = torch.rand(1, 2, 3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.randint(0, 3, (1, 3, 4), generator=g)
    assert torch.autograd.gradcheck(
        lambda t: soft_class_histograms(t, labels, 3, bins=8, sharpness=20.0, window=9), (x,)
    )


def test_sch_tiling_does_not_change_values_or_gradients(monkeypatch):
    import models.sch as sch

    pred, target, labels = random_case(12)
    p1, p2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    whole = sch_loss(p1, target, labels, num_classes=5)
    whole.backward()
    monkeypatch.setattr(sch, "_TILE_CPU", 37)  # many ragged tiles
    tiled = sch_loss(p2, target, labels, num_classes=5)
    tiled.backward()
    torch.testing.assert_close(tiled, whole, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-9)


def test_sch_runs_in_fp32_under_autocast():
    pred, target, labels = random_case(8)
    expected = sch_loss(pred.bfloat16().float(), target, labels, num_classes=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sch_loss(pred.bfloat16(), target, labels, num_classes=5)
        hist = soft_class_histograms(pred.bfloat16(), labels, 5)
    assert got.dtype == torch.float32 and hist.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)


def test_sch_presets_schedule_and_registry():
    drbn, snr = SemanticColorHistogramLoss.drbn(), SemanticColorHistogramLoss.snr()
    assert (drbn.weight, drbn.normalizer, drbn.every) == (1.0, "nchw3", 1)
    assert (snr.weight, snr.normalizer, snr.every) == (1e4, "nhw", 50)
    assert [s for s in range(120) if snr.should_apply(s)] == [0, 50, 100]
    assert all(drbn.should_apply(s) for s in range(5))
    built = create("loss/sch@1", preset="snr", every=10)
    assert isinstance(built, SemanticColorHistogramLoss) and (built.weight, built.every) == (1e4, 10)

    pred, target, labels = random_case(9, classes=59)
    raw = sch_loss(pred, target, labels, num_classes=59, normalizer="nhw")
    torch.testing.assert_close(snr(pred, target, labels), 1e4 * raw)
    torch.testing.assert_close(drbn(pred, target, labels), raw / (59 * 3))
    scores = F.one_hot(labels, 59).permute(0, 3, 1, 2).float()  # an N×K×H×W score map is argmax'ed
    torch.testing.assert_close(snr(pred, target, scores), snr(pred, target, labels))


def test_sch_rejects_bad_labels():
    pred, target, labels = random_case(10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        sch_loss(pred, target, labels + 1, num_classes=5)
    with pytest.raises(ValueError, match="hard class map"):
        sch_loss(pred, target, labels[:, :8], num_classes=5)
    with pytest.raises(ValueError, match="normalizer"):
        SemanticColorHistogramLoss(normalizer="mean")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- SA
def test_discriminator_parameter_count_and_names():
    d = Discriminator()
    assert sum(p.numel() for p in d.parameters()) == 4_725_377
    convs = {f"conv{i}" for i in range(10)}
    bns = {f"bn{i}" for i in range(2, 9)}
    assert {name for name, _ in d.named_children()} == convs | bns
    assert d.conv0.weight.shape == (64, 62, 3, 3) and d.conv1.weight.shape == (64, 3, 3, 3)
    assert d.conv9.weight.shape == (1, 512, 1, 1) and d.conv9.padding == (1, 1)


def test_discriminator_picks_entry_conv_by_channels():
    d = Discriminator()
    out3, out62 = d(torch.rand(2, 3, 32, 32)), d(torch.rand(2, 62, 32, 32))
    assert out3.shape == out62.shape == (2, 1)
    assert ((out3 > 0) & (out3 < 1)).all()
    with pytest.raises(ValueError, match="B×3×H×W images or B×62×H×W"):
        d(torch.rand(2, 4, 32, 32))


def test_sa_parameters_are_exactly_the_discriminators():
    sa = create("loss/sa@1")
    assert isinstance(sa, SemanticAdversarialLoss) and isinstance(sa, torch.nn.Module)
    with_params = [name for name, m in sa.named_modules() if name and any(True for _ in m.parameters())]
    assert with_params[0] == "discriminator" and all(n.startswith("discriminator") for n in with_params)
    assert [id(p) for p in sa.parameters()] == [id(p) for p in sa.discriminator.parameters()]
    assert sum(p.numel() for p in sa.parameters()) == 4_725_377
    assert (sa.lam, sa.weight, sa.official_compat) == (0.9, 0.1, False)


def soft_probs(labels: torch.Tensor, classes: int = 59) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    logits = 8.0 * F.one_hot(labels, classes).permute(0, 3, 1, 2).float()
    return (logits + 0.1 * torch.randn(logits.shape, generator=g)).softmax(1)


def sa_inputs(seed=0, size=32):
    """Class 7 covers the top half, class 3 most of the bottom half, class 11 the rest."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((2, size, size), 7, dtype=torch.long)
    labels[:, size // 2 :, : 5 * size // 8] = 3
    labels[:, size // 2 :, 5 * size // 8 :] = 11
    fake = torch.rand(2, 3, size, size, generator=g)
    real = torch.rand(2, 3, size, size, generator=g)
    return fake, real, soft_probs(labels), labels


def test_largest_regions_by_soft_area():
    _, _, probs, labels = sa_inputs()
    regions = SemanticAdversarialLoss.largest_regions(probs)
    assert regions.tolist() == [[7, 3], [7, 3]]


def test_sa_gradients_to_discriminator_and_generator():
    sa = SemanticAdversarialLoss()
    fake, real, probs, _ = sa_inputs()
    fake.requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    out = sa.discriminator_loss(fake, real, probs)
    out.loss.backward()
    assert fake.grad is None and probs.grad is None  # the clean D step sees a detached fake
    for name, p in sa.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    sa.zero_grad()
    g_loss = sa.generator_loss(fake, probs)
    g_loss.backward()
    assert g_loss.dtype == torch.float32 and g_loss.item() > 0
    assert torch.isfinite(fake.grad).all() and fake.grad.abs().sum() > 0
    assert probs.grad is not None and probs.grad.abs().sum() > 0  # P is not detached for G
    assert sa.discriminator.conv1.weight.grad is None  # G sees only the 62-channel path


def test_sa_generator_loss_is_weighted_lsgan_on_62_channels():
    sa = SemanticAdversarialLoss(weight=0.25)
    fake, _, probs, _ = sa_inputs()
    seen = []
    sa.discriminator.forward = lambda x: (seen.append(x.shape[1]), torch.full((x.shape[0], 1), 0.3))[1]
    torch.testing.assert_close(sa.generator_loss(fake, probs), torch.tensor(0.25 * 0.7**2))
    assert seen == [62]


class ScoreByRegionMean:
    """Stand-in discriminator: the score of an input is its mean intensity (so the tests control it)."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return x[:, :3].mean(dim=(1, 2, 3)).clamp(0, 1)[:, None]


def test_sa_picks_the_region_the_discriminator_scores_worst():
    sa = SemanticAdversarialLoss()
    fake, real, probs, labels = sa_inputs()
    # Image 0 is bright in class 3, image 1 in class 7. D scores an input by its mean, so for the fake
    # (target 0) the bright region is worst, for the real (target 1) the dark one: the picks differ per
    # image and between fake and real.
    bright = torch.stack([labels[0] == 3, labels[1] == 7]).unsqueeze(1).expand(-1, 3, -1, -1)
    fake = torch.where(bright, 0.9, 0.1)
    real = torch.where(bright, 0.9, 0.05)
    sa.discriminator.forward = ScoreByRegionMean()

    out = sa.discriminator_loss(fake, real, probs)
    assert out.regions.tolist() == [[7, 3], [7, 3]]
    assert out.fake_region.tolist() == [1, 0] and out.fake_class.tolist() == [3, 7]
    assert out.real_region.tolist() == [0, 1] and out.real_class.tolist() == [7, 3]
    # The chosen slot is the argmax of the per-region losses, which really come from D's scores.
    assert torch.equal(out.fake_region, out.fake_region_losses.argmax(1))
    assert torch.equal(out.real_region, out.real_region_losses.argmax(1))
    d = ScoreByRegionMean()
    m = probs.gather(1, out.regions[:, :, None, None].expand(-1, -1, 32, 32))
    fake_local = torch.stack([d(fake * m[:, i : i + 1]).squeeze(1) ** 2 for i in range(2)], 1)
    real_local = torch.stack([(1 - d(real * m[:, i : i + 1]).squeeze(1)) ** 2 for i in range(2)], 1)
    torch.testing.assert_close(out.fake_region_losses, fake_local)
    torch.testing.assert_close(out.real_region_losses, real_local)
    # Loss = lam * global / 2 + (1 - lam) * (max fake-local + max real-local) / 2, averaged over images;
    # the global term is the 62-channel input only.
    glob = d(torch.cat([fake, probs], 1)) ** 2 + (1 - d(torch.cat([real, probs], 1))) ** 2
    local = fake_local.amax(1) + real_local.amax(1)
    torch.testing.assert_close(out.loss, (0.9 * glob.mean() + 0.1 * local.mean()) / 2)


def test_sa_clean_trains_d_only_on_the_62_channel_global_and_the_selected_regions():
    sa = SemanticAdversarialLoss()
    fake, real, probs, labels = sa_inputs()
    bright = torch.stack([labels[0] == 3, labels[1] == 7]).unsqueeze(1).expand(-1, 3, -1, -1)
    fake, real = torch.where(bright, 0.9, 0.1), torch.where(bright, 0.9, 0.05)
    real_probs = probs.flip(0)
    spy = ScoreByRegionMean()
    sa.discriminator.forward = spy
    out = sa.discriminator_loss(fake, real, probs, real_probs)
    m = probs.gather(1, out.regions[:, :, None, None].expand(-1, -1, 32, 32))
    # Two scoring passes over both candidates (fake, real), then the four trained passes: the 62-ch
    # fake and real inputs and the per-image hardest region of fake and of real. No RGB global pass.
    assert [tuple(x.shape[:2]) for x in spy.inputs] == [(4, 3), (4, 3), (2, 62), (2, 62), (2, 3), (2, 3)]
    torch.testing.assert_close(spy.inputs[0], (fake[:, None] * m[:, :, None]).flatten(0, 1))
    torch.testing.assert_close(spy.inputs[1], (real[:, None] * m[:, :, None]).flatten(0, 1))
    torch.testing.assert_close(spy.inputs[2], torch.cat([fake, probs], 1))
    torch.testing.assert_close(spy.inputs[3], torch.cat([real, real_probs], 1))
    picked = [m[i, out.fake_region[i]] for i in range(2)], [m[i, out.real_region[i]] for i in range(2)]
    torch.testing.assert_close(spy.inputs[4], fake * torch.stack(picked[0])[:, None])
    torch.testing.assert_close(spy.inputs[5], real * torch.stack(picked[1])[:, None])
    assert out.fake_region.tolist() == [1, 0] and out.real_region.tolist() == [0, 1]


def test_sa_clean_d_step_updates_bn_running_stats_once_per_trained_pass():
    torch.manual_seed(0)
    sa = SemanticAdversarialLoss()
    reference = copy.deepcopy(sa.discriminator)
    fake, real, probs, _ = sa_inputs()
    out = sa.discriminator_loss(fake, real, probs)
    # The no-grad region scoring leaves no trace: the stats equal those of the four trained passes alone.
    m = probs.gather(1, out.regions[:, :, None, None].expand(-1, -1, 32, 32))
    rows = torch.arange(2)
    bf16 = sa.resolved_precision(fake.device) == "bf16"  # the reference passes run in the same precision
    for x in (
        torch.cat([fake, probs], 1),
        torch.cat([real, probs], 1),
        fake * m[rows, out.fake_region][:, None],
        real * m[rows, out.real_region][:, None],
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            reference(x)
    for (name, got), (_, want) in zip(
        sa.discriminator.named_buffers(), reference.named_buffers(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert sa.discriminator.bn2.num_batches_tracked.item() == 4
    assert all(
        bn.track_running_stats for bn in sa.discriminator.modules() if isinstance(bn, torch.nn.BatchNorm2d)
    )
    assert not out.fake_region_losses.requires_grad and not out.real_region_losses.requires_grad


def test_official_compat_uses_second_largest_class_for_both_masks():
    sa = SemanticAdversarialLoss(official_compat=True)
    fake, real, probs, _ = sa_inputs()
    fake.requires_grad_(True)
    spy = ScoreByRegionMean()
    sa.discriminator.forward = spy
    out = sa.discriminator_loss(fake, real, probs)
    assert out.regions.tolist() == [[3, 3], [3, 3]]
    # Released call order: D(fake), D(real), D(fake*M1), D(fake*M2), D(real*M1), D(real*M2); RGB only.
    assert len(spy.inputs) == 6 and all(x.shape[1] == 3 for x in spy.inputs)
    m2 = probs[:, 3:4]
    for got, expected in zip(spy.inputs[2:], [fake * m2, fake * m2, real * m2, real * m2], strict=True):
        torch.testing.assert_close(got, expected.detach())
    assert out.fake_region.tolist() == [1, 1] and out.real_region.tolist() == [1, 1]  # ties -> region 2
    out.loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0  # no detach, as released


def test_official_compat_leaves_the_62_channel_entry_untrained():
    fake, real, probs, _ = sa_inputs()
    compat, clean = SemanticAdversarialLoss(official_compat=True), SemanticAdversarialLoss()
    compat.discriminator_loss(fake, real, probs).loss.backward()
    clean.discriminator_loss(fake, real, probs).loss.backward()
    assert compat.discriminator.conv0.weight.grad is None
    assert clean.discriminator.conv0.weight.grad.abs().sum() > 0


def test_sa_rejects_mismatched_probabilities():
    sa = SemanticAdversarialLoss()
    fake, real, probs, _ = sa_inputs()
    with pytest.raises(ValueError, match="resize the probabilities"):
        sa.discriminator_loss(fake, real, probs[..., :16])
    with pytest.raises(ValueError, match="B×59×H×W"):
        sa.generator_loss(fake, probs[:, :10])


def test_sa_generator_backward_skips_discriminator_weight_gradients():
    sa = SemanticAdversarialLoss()
    fake, _, probs, _ = sa_inputs()
    fake.requires_grad_(True)
    sa.generator_loss(fake, probs).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in sa.parameters())  # D's weights were constants for G
    assert all(p.requires_grad for p in sa.parameters())  # ... and are trainable again for the D step


# ---------------------------------------------------------------------------------- SA precision
def test_discriminator_layouts_give_the_same_scores_and_gradients():
    torch.manual_seed(0)
    nchw = Discriminator(channels_last=False)
    cl = copy.deepcopy(nchw)
    cl.channels_last = True
    x = torch.rand(2, 62, 32, 32)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    s1, s2 = nchw(x1), cl(x2)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-6)
    # Gradients with batch-statistics BN are hypersensitive to rounding (a ReLU input near 0 flips and the
    # batch statistics spread it), so they are compared with running statistics (eval mode).
    nchw.eval()
    cl.eval()
    nchw(x1).sum().backward()
    cl(x2).sum().backward()
    for got, want in ((x2.grad, x1.grad), (cl.conv0.weight.grad, nchw.conv0.weight.grad)):
        assert (got - want).norm() <= 1e-4 * want.norm()


def _sa_pair(precision: str) -> tuple[SemanticAdversarialLoss, SemanticAdversarialLoss]:
    torch.manual_seed(0)
    reference = SemanticAdversarialLoss(precision="fp32")
    other = SemanticAdversarialLoss(precision=precision)
    other.load_state_dict(reference.state_dict())
    return reference, other


def _conv_output_dtypes(module: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_sa_bf16_runs_the_d_step_in_bf16_and_keeps_the_generator_pass_fp32():
    reference, sa = _sa_pair("bf16")
    seen = _conv_output_dtypes(sa.discriminator)
    fake, real, probs, _ = sa_inputs(size=64)
    d_out = {}
    for name, module in (("fp32", reference), ("bf16", sa)):
        d_out[name] = module.discriminator_loss(fake, real, probs)
        d_out[name].loss.backward()
    assert len(seen) == 6 * 9 and set(seen) == {torch.bfloat16}  # 6 D-step passes x 9 convs, all bf16
    assert d_out["bf16"].loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in sa.parameters())
    assert all(b.dtype in (torch.float32, torch.long) for b in sa.discriminator.buffers())
    # Same D loss to bf16's digits. The D's weight gradients turn by about as much as the fp32 gradient
    # itself does when its input is perturbed by bf16's rounding (0.4%): cos ~0.92 on these inputs.
    torch.testing.assert_close(d_out["bf16"].loss, d_out["fp32"].loss, rtol=2e-3, atol=0)
    grad = torch.cat([p.grad.flatten() for p in sa.parameters()])
    ref_grad = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert F.cosine_similarity(grad, ref_grad, dim=0) > 0.85
    assert torch.isfinite(grad).all()

    # The generator's pass runs in fp32: the very same loss and gradient as with an fp32 D step.
    seen.clear()
    g_fake = {name: fake.clone().requires_grad_(True) for name in d_out}
    g_loss = {name: m.generator_loss(g_fake[name], probs) for name, m in (("fp32", reference), ("bf16", sa))}
    assert set(seen) == {torch.float32}
    for loss in g_loss.values():
        loss.backward()
    torch.testing.assert_close(g_loss["bf16"], g_loss["fp32"], rtol=0, atol=0)
    torch.testing.assert_close(g_fake["bf16"].grad, g_fake["fp32"].grad, rtol=0, atol=0)


@pytest.mark.parametrize("native", [False, True])
def test_sa_auto_precision_follows_the_devices_native_bf16(monkeypatch, native):
    monkeypatch.setattr(losses_module, "native_bf16", lambda device: native)
    reference, sa = _sa_pair("auto")
    assert sa.resolved_precision(torch.device("cpu")) == ("bf16" if native else "fp32")
    assert reference.resolved_precision(torch.device("cpu")) == "fp32"
    # official-compat backpropagates the D loss into G, as released: "auto" keeps that path fp32
    compat = SemanticAdversarialLoss(official_compat=True)
    assert compat.resolved_precision(torch.device("cpu")) == "fp32"
    assert (
        SemanticAdversarialLoss(official_compat=True, precision="bf16").resolved_precision(
            torch.device("cpu")
        )
        == "bf16"
    )
    seen = _conv_output_dtypes(sa.discriminator)
    fake, real, probs, _ = sa_inputs()
    got = sa.discriminator_loss(fake, real, probs).loss
    want = reference.discriminator_loss(fake, real, probs).loss
    assert set(seen) == {torch.bfloat16 if native else torch.float32}
    if not native:  # without native bf16, "auto" is exactly the fp32 computation
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sa_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="'auto', 'fp32' or 'bf16'"):
        SemanticAdversarialLoss(precision="fp16")


def test_native_bf16_is_false_where_bf16_would_be_emulated():
    assert losses_module.native_bf16(torch.device("meta")) is False
    if not torch.cuda.is_available():
        assert losses_module.native_bf16(torch.device("cuda")) is False


def test_ssim_scores_a_negated_image_as_well_as_the_image():
    """Why DRBN's smallest network gets a Charbonnier anchor in the learning benchmark (docs/method.md §6.1)."""
    from components.baseline_losses import CharbonnierLoss, ssim
    from components.baselines import get_family

    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 3, 32, 32, generator=g) * 0.6 + 0.2
    # on texture the released SSIM loss can hardly tell a negated image from the image itself
    assert ssim(-y, y) > 0.95 and ssim(y, y) > 0.999
    anchor = CharbonnierLoss(reduction="mean")
    assert anchor(-y, y) > 0.5 > 1e-2 > anchor(y, y)
    recipe = get_family("baseline/drbn@1").smoke_recipe
    assert recipe["losses.charbonnier"]["params"]["reduction"] == "mean"
