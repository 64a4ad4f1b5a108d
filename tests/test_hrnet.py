"""HRNet: exact official W48/59 layout (keys, counts, params), fusion rules, shapes, derived outputs."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from models.hrnet import (
    HRNet,
    HRNetConfig,
    HRNetOutput,
    class_probabilities,
    hrnet_w18_small_config,
    hrnet_w48_config,
    label_map,
    labels_of,
    upsample_logits,
)

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_bn_keys(prefix: str) -> list[str]:
    return [f"{prefix}.0.weight"] + [f"{prefix}.1.{k}" for k in BN_KEYS]


def _expected_w48_keys() -> list[str]:
    """The official key list, generated independently from the naming rules in docs/method.md §2.1."""
    keys = ["conv1.weight", *(f"bn1.{k}" for k in BN_KEYS), "conv2.weight", *(f"bn2.{k}" for k in BN_KEYS)]
    for b in range(4):
        for n in (1, 2, 3):
            keys += [f"layer1.{b}.conv{n}.weight"] + [f"layer1.{b}.bn{n}.{k}" for k in BN_KEYS]
    keys += _conv_bn_keys("layer1.0.downsample")
    keys += _conv_bn_keys("transition1.0") + _conv_bn_keys("transition1.1.0")
    keys += _conv_bn_keys("transition2.2.0") + _conv_bn_keys("transition3.3.0")
    for stage, modules, branches in (("stage2", 1, 2), ("stage3", 4, 3), ("stage4", 3, 4)):
        for m in range(modules):
            for b in range(branches):
                for blk in range(4):
                    for n in (1, 2):
                        p = f"{stage}.{m}.branches.{b}.{blk}"
                        keys += [f"{p}.conv{n}.weight"] + [f"{p}.bn{n}.{k}" for k in BN_KEYS]
            for i in range(branches):
                for j in range(branches):
                    p = f"{stage}.{m}.fuse_layers.{i}.{j}"
                    if j > i:
                        keys += _conv_bn_keys(p)
                    elif j < i:
                        for k in range(i - j):
                            keys += _conv_bn_keys(f"{p}.{k}")
    keys += ["last_layer.0.weight", "last_layer.0.bias", *(f"last_layer.1.{k}" for k in BN_KEYS)]
    keys += ["last_layer.3.weight", "last_layer.3.bias"]
    return keys


@pytest.fixture(scope="module")
def w48() -> HRNet:
    return HRNet(hrnet_w48_config(59)).eval()


def test_w48_parameter_count_and_key_counts(w48: HRNet) -> None:
    sd = w48.state_dict()
    assert sum(p.numel() for p in w48.parameters()) == 65_888_219
    assert len(sd) == 1_839
    assert sum(k.endswith("num_batches_tracked") for k in sd) == 306
    groups = collections.Counter(k.split(".")[0] for k in sd)
    assert {k: groups[k] for k in ("layer1", "transition1", "stage2", "transition2")} == {
        "layer1": 78,
        "transition1": 12,
        "stage2": 108,
        "transition2": 6,
    }
    assert (groups["stage3"], groups["transition3"], groups["stage4"], groups["last_layer"]) == (
        744,
        6,
        864,
        9,
    )
    assert set(groups) == {"conv1", "bn1", "conv2", "bn2", "layer1", "transition1", "stage2", "transition2",
                           "stage3", "transition3", "stage4", "last_layer"}  # fmt: skip


def test_w48_key_names_equal_official_layout(w48: HRNet) -> None:
    expected = _expected_w48_keys()
    assert len(expected) == 1_839
    assert set(w48.state_dict()) == set(expected)


def test_w48_shapes_of_landmark_tensors(w48: HRNet) -> None:
    sd = w48.state_dict()
    shapes = {
        "conv1.weight": (64, 3, 3, 3),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "transition1.0.0.weight": (48, 256, 3, 3),
        "transition1.1.0.0.weight": (96, 256, 3, 3),
        "transition2.2.0.0.weight": (192, 96, 3, 3),
        "transition3.3.0.0.weight": (384, 192, 3, 3),
        "stage2.0.fuse_layers.0.1.0.weight": (48, 96, 1, 1),
        "stage2.0.fuse_layers.1.0.0.0.weight": (96, 48, 3, 3),
        # j < i chain: intermediate convs keep C_j, the last maps to C_i
        "stage4.2.fuse_layers.3.0.0.0.weight": (48, 48, 3, 3),
        "stage4.2.fuse_layers.3.0.1.0.weight": (48, 48, 3, 3),
        "stage4.2.fuse_layers.3.0.2.0.weight": (384, 48, 3, 3),
        "last_layer.0.weight": (720, 720, 1, 1),
        "last_layer.3.weight": (59, 720, 1, 1),
        "last_layer.3.bias": (59,),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes


def test_transition_placeholders_and_fuse_structure(w48: HRNet) -> None:
    assert w48.transition2[0] is None and w48.transition2[1] is None
    assert [t is None for t in w48.transition3] == [True, True, True, False]
    module = w48.stage3[0]
    assert all(module.fuse_layers[i][i] is None for i in range(3))
    chain = module.fuse_layers[2][0]  # two stride-2 steps: ReLU after the first only
    assert len(chain) == 2
    assert isinstance(chain[0][2], nn.ReLU) and len(chain[1]) == 2
    assert chain[0][0].stride == (2, 2) and chain[1][0].stride == (2, 2)
    up = module.fuse_layers[0][2]
    assert up[0].kernel_size == (1, 1) and len(up) == 2


def test_batchnorm_is_plain_and_head_has_bias(w48: HRNet) -> None:
    norms = [m for m in w48.modules() if "Norm" in type(m).__name__]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)
    assert len(norms) == 306
    assert w48.last_layer[0].bias is not None and w48.conv1.bias is None


def test_w48_forward_small_input(w48: HRNet) -> None:
    with torch.inference_mode():
        out = w48(torch.rand(1, 3, 64, 64))
    assert isinstance(out, HRNetOutput)
    assert [tuple(f.shape) for f in out.features] == [
        (1, 48, 16, 16),
        (1, 96, 8, 8),
        (1, 192, 4, 4),
        (1, 384, 2, 2),
    ]
    assert tuple(out.logits.shape) == (1, 59, 16, 16)


@pytest.fixture(scope="module")
def small() -> HRNet:
    torch.manual_seed(0)
    model = HRNet(hrnet_w18_small_config())
    model.init_weights("kaiming", generator=torch.Generator().manual_seed(0))
    return model.eval()


@pytest.mark.parametrize(("h", "w"), [(97, 131), (64, 96), (33, 17)])
def test_unpadded_shapes_follow_ceil_halving(small: HRNet, h: int, w: int) -> None:
    with torch.inference_mode():
        out = small(torch.rand(1, 3, h, w))

    def c(n: int, s: int) -> int:
        return -(-n // s)

    expect = [(ch, c(h, s), c(w, s)) for ch, s in zip((18, 36, 72, 144), (4, 8, 16, 32), strict=True)]
    assert [tuple(f.shape[1:]) for f in out.features] == expect
    assert tuple(out.logits.shape[1:]) == (59, c(h, 4), c(w, 4))


def test_channels_last_matches_contiguous(small: HRNet) -> None:
    x = torch.rand(2, 3, 64, 96)
    with torch.inference_mode():
        ref = small(x).logits
        cl = small.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)
        ).logits
    small.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)


def test_align_corners_setting_is_used() -> None:
    cfg = hrnet_w18_small_config()
    a = HRNet(cfg)
    a.init_weights("kaiming", generator=torch.Generator().manual_seed(1))
    b = HRNet(HRNetConfig.from_dict({**cfg.to_dict(), "align_corners": False}))
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert not torch.allclose(a.eval()(x).logits, b.eval()(x).logits)


def test_init_is_seeded() -> None:
    cfg = hrnet_w18_small_config()
    nets = [HRNet(cfg) for _ in range(3)]
    for net, seed in zip(nets, (5, 5, 6), strict=True):
        net.init_weights("kaiming", generator=torch.Generator().manual_seed(seed))
    w = [n.stage4[0].branches[0][0].conv1.weight for n in nets]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    with pytest.raises(ValueError, match="init scheme"):
        nets[0].init_weights("xavier")  # type: ignore[arg-type]


def test_config_roundtrip_and_validation() -> None:
    cfg = hrnet_w48_config()
    again = HRNetConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert cfg.feature_channels == (48, 96, 192, 384)
    with pytest.raises(ValueError, match="one lower-resolution branch"):
        HRNetConfig.from_dict({**cfg.to_dict(), "stage3": {**cfg.to_dict()["stage2"]}})


def test_upsample_logits_is_x4_align_corners_then_crop() -> None:
    logits = torch.randn(2, 5, 4, 6)
    full = upsample_logits(logits)
    assert full.shape[-2:] == (16, 24)
    # align_corners=True keeps the corner samples exactly
    torch.testing.assert_close(full[..., 0, 0], logits[..., 0, 0])
    torch.testing.assert_close(full[..., -1, -1], logits[..., -1, -1])
    cropped = upsample_logits(logits, (15, 22))
    assert torch.equal(cropped, full[..., :15, :22])
    with pytest.raises(ValueError, match="does not match logits grid"):
        upsample_logits(logits, (12, 24))


def test_probabilities_and_labels() -> None:
    logits = torch.randn(1, 7, 5, 5)
    probs = class_probabilities(logits, (18, 20))
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 18, 20))
    labels = label_map(logits, (18, 20))
    assert labels.dtype == torch.int64 and labels.shape == (1, 18, 20)
    assert torch.equal(labels, probs.argmax(1))


def test_labels_of_is_argmax_with_first_index_on_ties() -> None:
    full = torch.randn(2, 6, 9, 11)
    assert torch.equal(labels_of(full), full.argmax(dim=1))
    tied = torch.zeros(1, 4, 2, 2)
    tied[:, 1] = tied[:, 3] = 1.0  # classes 1 and 3 tie for the maximum everywhere
    assert torch.equal(labels_of(tied), torch.ones(1, 2, 2, dtype=torch.int64))
    assert torch.equal(labels_of(tied), tied.argmax(dim=1))
