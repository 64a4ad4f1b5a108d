"""HWMNet (``models/hwmnet.py``) and its loss (the registered ``charbonnier``): the released parameter
layout, strict loading of a released-style checkpoint, padding, the Haar transform, SE placement and the
sem contract.

The layout in ``tests/data/hwmnet_keys`` was listed from the official code (see its README). Layout tests
build the 66.6 M-parameter network on the meta device (no memory, no init); the checkpoint round trip
uses uninitialised CPU storage; forward tests use a narrow network (``wf=8``) wherever the width does not
matter.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.baselines.official import load_official_weights
from components.checkpoints import StateDictMismatchError, load_checkpoint
from models.hwmnet import HalfWaveletBlock, HWMNet, SelectiveFusion, haar_dwt, haar_iwt
from models.se import SemanticEmbedding
from tests.key_lists import Shape, mapping_diff, read_key_table
from tests.priors_fixtures import PriorsLike

torch.set_num_threads(1)

KEYS = Path(__file__).parent / "data" / "hwmnet_keys" / "hwmnet-lol.tsv"

#: Parameters of the released HWMNet-96 (distinct tensors) and the state dict's element total, which
#: counts each half wavelet block's shared PReLU slope twice (``body.1`` and ``activate``; 7 blocks).
PARAMS = 66_564_649
STATE_DICT_ELEMENTS = PARAMS + 7
#: Default SE blocks (GDFN, 2 heads, factor 2.66) on 96, 192 and 384 channels for F0, F1, F2.
SE_PARAMS = 204_656 + 805_022 + 3_194_060


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(**kwargs: object) -> HWMNet:
    with torch.device("meta"):
        return HWMNet(**kwargs)  # type: ignore[arg-type]


def uninitialised(**kwargs: object) -> HWMNet:
    """A CPU network with storage but without the (slow, here pointless) weight initialisation."""
    return on_meta(**kwargs).to_empty(device="cpu")


def priors(b: int, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """SKB outputs for an H×W image: F0 (48 ch) at 1/4, F1 (96) at 1/8, F2 (192) at 1/16, sizes rounded up."""
    return tuple(  # type: ignore[return-value]
        torch.rand(b, c, math.ceil(h / s), math.ceil(w / s)) for c, s in ((48, 4), (96, 8), (192, 16))
    )


class Recorder(nn.Module):
    """Stand-in SE block: records (host, prior) shapes and returns the host unchanged."""

    def __init__(self, sem_channels: int, channels: int) -> None:
        super().__init__()
        self.sem_channels, self.channels = sem_channels, channels
        self.calls: list[tuple[Shape, Shape]] = []

    def forward(self, x: Tensor, sem: Tensor) -> Tensor:
        self.calls.append((tuple(x.shape), tuple(sem.shape)))
        return x


# ---------------------------------------------------------------------------------------------------
# Released layout and checkpoints
# ---------------------------------------------------------------------------------------------------
def test_keys_and_shapes_equal_the_released_layout():
    reference = read_key_table(KEYS)
    net = on_meta()
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    released = {k: shape for k, (shape, _) in reference.items()}
    assert ours == released, "state dict differs from the released HWMNet:\n" + mapping_diff(ours, released)
    assert list(ours) == list(released)  # even the order, so a listing diff of checkpoints reads naturally
    assert all(math.prod(shape) == numel for shape, numel in reference.values())


def test_parameter_count_equals_the_released_one():
    reference = read_key_table(KEYS)
    assert len(reference) == 120
    assert sum(numel for _, numel in reference.values()) == STATE_DICT_ELEMENTS
    net = on_meta()
    assert sum(v.numel() for v in net.state_dict().values()) == STATE_DICT_ELEMENTS
    assert n_params(net) == PARAMS  # the aliased PReLU slopes count once
    aliased = [k for k in reference if k.endswith("activate.weight")]
    assert len(aliased) == 7 and all(reference[k] == ((1,), 1) for k in aliased)


def test_each_half_wavelet_block_shares_one_prelu_as_released():
    block = HalfWaveletBlock(8)
    assert block.activate is block.body[1]
    keys = block.state_dict().keys()
    assert {"body.1.weight", "activate.weight"} <= keys


def test_skf_adds_exactly_the_se_blocks():
    plain, skf = on_meta(), on_meta(skf=True)
    assert n_params(skf) - n_params(plain) == SE_PARAMS
    extra = skf.state_dict().keys() - plain.state_dict().keys()
    assert plain.state_dict().keys() <= skf.state_dict().keys()
    assert {k.split(".")[0] for k in extra} == {"att_block_1", "att_block_2", "att_block_3"}
    assert (skf.att_block_1.channels, skf.att_block_2.channels, skf.att_block_3.channels) == (96, 192, 384)
    assert (skf.att_block_1.sem_channels, skf.att_block_2.sem_channels, skf.att_block_3.sem_channels) == (
        48,
        96,
        192,
    )
    assert not any("att_block" in k for k in plain.state_dict())


@pytest.fixture(scope="module")
def released_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    """A random plain checkpoint saved like ``train.py``: ``{"epoch", "state_dict", "optimizer"}``, keys
    prefixed ``module.`` (DataParallel). Returns the file and the unprefixed tensors."""
    torch.manual_seed(0)
    source = uninitialised()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0.0, 0.02)
    state = source.state_dict()
    path = tmp_path_factory.mktemp("hwmnet") / "model_bestPSNR.pth"
    torch.save(
        {
            "epoch": 87,
            "state_dict": {f"module.{k}": v for k, v in state.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1.2e-4, "params": [0, 1]}]},
        },
        path,
    )
    return path, state


def test_released_style_checkpoint_loads_strictly(released_checkpoint):
    path, state = released_checkpoint
    net = uninitialised()
    assert load_official_weights(net, path) == 120
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_plain_checkpoint_into_skf_misses_only_the_se_blocks(released_checkpoint):
    path, state = released_checkpoint
    skf = uninitialised(skf=True)
    result = skf.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys, "the SE blocks must be missing"
    assert all(k.split(".")[0] in {"att_block_1", "att_block_2", "att_block_3"} for k in result.missing_keys)
    assert sorted(result.missing_keys) == sorted(k for k in skf.state_dict() if k.startswith("att_block_"))
    with pytest.raises(StateDictMismatchError, match="att_block"):
        load_official_weights(skf, {f"module.{k}": v for k, v in state.items()})


def test_the_file_and_its_state_dict_agree(released_checkpoint):
    """What the SKF test loads from memory is what the file holds, ``module.`` and nesting removed."""
    path, state = released_checkpoint
    loaded = load_checkpoint(path)
    assert loaded.extra["epoch"] == 87
    assert list(loaded.state_dict) == list(state)
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in state.items())


def test_a_checkpoint_of_the_official_default_width_is_refused(released_checkpoint):
    _, state = released_checkpoint
    with pytest.raises(StateDictMismatchError, match="shape mismatch"):
        load_official_weights(uninitialised(wf=64), state)


# ---------------------------------------------------------------------------------------------------
# Haar transform and fusion
# ---------------------------------------------------------------------------------------------------
def test_haar_dwt_on_one_block():
    # [[a, c], [b, d]] = [[1, 2], [3, 4]]
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    ll, hl, lh, hh = haar_dwt(x).flatten().tolist()
    assert ll == pytest.approx((1 + 3 + 2 + 4) / 2)
    assert hl == pytest.approx((-1 - 3 + 2 + 4) / 2)  # right column minus left
    assert lh == pytest.approx((-1 + 3 - 2 + 4) / 2)  # bottom row minus top
    assert hh == pytest.approx((1 - 3 - 2 + 4) / 2)


def test_haar_dwt_is_orthonormal_and_inverted_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    coeffs = haar_dwt(x)
    assert coeffs.shape == (2, 12, 3, 5)
    torch.testing.assert_close(coeffs.square().sum(), x.square().sum())  # energy preserved
    torch.testing.assert_close(haar_iwt(coeffs), x)
    y = torch.randn(1, 8, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(haar_dwt(haar_iwt(y)), y)
    with pytest.raises(ValueError, match="even"):
        haar_dwt(torch.zeros(1, 1, 5, 4))


def test_selective_fusion_is_a_convex_combination():
    torch.manual_seed(0)
    fusion = SelectiveFusion(8, branches=4)
    x = torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(fusion([x, x, x, x]), x)  # softmax weights over branches sum to one
    feats = [torch.rand(2, 8, 5, 6) + k for k in range(4)]
    out = fusion(feats)
    assert (out >= feats[0] - 1e-6).all() and (out <= feats[-1] + 1e-6).all()
    with pytest.raises(ValueError, match="4 branches"):
        fusion(feats[:3])


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small() -> HWMNet:
    torch.manual_seed(0)
    return HWMNet(wf=8).eval()


@pytest.mark.parametrize("size", [(37, 45), (61, 30), (16, 16), (5, 7)])
def test_forward_any_size(small, size):
    low = torch.rand(2, 3, *size)
    with torch.no_grad():
        out = small(low)
    assert out.shape == low.shape and torch.isfinite(out).all()


def test_released_width_forward():
    torch.manual_seed(0)
    net = HWMNet().eval()
    low = torch.rand(1, 3, 20, 27)
    with torch.no_grad():
        assert net(low).shape == low.shape


def test_stride_is_the_total_downscale():
    assert HWMNet.stride == 16 and on_meta().stride == 16
    assert on_meta(depth=3).stride == 8 and on_meta(depth=5).stride == 32


def test_padding_is_the_official_demos(small):
    """``demo.py``: reflect-pad bottom/right to the next multiple of 16, run, crop."""
    low = torch.rand(1, 3, 37, 45)
    padded = F.pad(low, (0, 48 - 45, 0, 48 - 37), mode="reflect")
    with torch.no_grad():
        torch.testing.assert_close(small(low), small(padded)[..., :37, :45])


def test_output_is_the_input_plus_a_residual(small):
    net = HWMNet(wf=8).eval()
    net.load_state_dict(small.state_dict())
    with torch.no_grad():
        net.last.weight.zero_()
        net.last.bias.zero_()
    low = torch.rand(1, 3, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(low), low)


def test_rejects_bad_input_and_sizes(small):
    with pytest.raises(ValueError, match="B×3×H×W"):
        small(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="depth >= 4"):
        on_meta(skf=True, depth=3)
    with pytest.raises(ValueError, match="even"):
        HalfWaveletBlock(7)


# ---------------------------------------------------------------------------------------------------
# SKF: SE placement and the sem contract
# ---------------------------------------------------------------------------------------------------
def test_se_blocks_sit_on_the_decoder_stages_at_the_claimed_scales():
    """Forward hooks on the real SE blocks: host at 1/4, 1/2, 1/1 of the padded image, deepest first, each
    prior ×4 coarser than its host; an unpadded host gets its prior as it is (the block resizes it)."""
    torch.manual_seed(0)
    net = HWMNet(skf=True, wf=8).eval()
    seen: list[tuple[str, Shape, Shape, Shape]] = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple[Tensor, Tensor], out: Tensor) -> None:
            seen.append((name, tuple(args[0].shape), tuple(args[1].shape), tuple(out.shape)))

        return record

    for name in ("att_block_1", "att_block_2", "att_block_3"):
        getattr(net, name).register_forward_hook(hook(name))
    low = torch.rand(1, 3, 64, 48)  # already a multiple of 16: no padding
    with torch.no_grad():
        out = net(low, priors(1, 64, 48))
    assert out.shape == low.shape
    assert seen == [
        ("att_block_3", (1, 32, 16, 12), (1, 192, 4, 3), (1, 32, 16, 12)),  # up_path.0 at 1/4, F2 at 1/16
        ("att_block_2", (1, 16, 32, 24), (1, 96, 8, 6), (1, 16, 32, 24)),  # up_path.1 at 1/2, F1 at 1/8
        ("att_block_1", (1, 8, 64, 48), (1, 48, 16, 12), (1, 8, 64, 48)),  # up_path.2 at 1/1, F0 at 1/4
    ]


def test_se_hosts_are_the_decoder_stage_outputs_on_padded_images():
    torch.manual_seed(0)
    skf = HWMNet(skf=True, wf=8, se_factory=Recorder).eval()
    plain = HWMNet(wf=8).eval()
    plain.load_state_dict(skf.state_dict())  # the recorders have no parameters
    stage_out: list[Shape] = []
    for stage in skf.up_path:
        stage.register_forward_hook(lambda m, a, out: stage_out.append(tuple(out.shape)))
    low = torch.rand(1, 3, 37, 45)  # padded to 48×48
    with torch.no_grad():
        torch.testing.assert_close(skf(low, priors(1, 37, 45)), plain(low))  # identity blocks change nothing
    assert stage_out == [(1, 32, 12, 12), (1, 16, 24, 24), (1, 8, 48, 48)]
    # priors fitted to the valid region and replicate-padded to the padded host
    assert skf.att_block_3.calls == [((1, 32, 12, 12), (1, 192, 12, 12))]
    assert skf.att_block_2.calls == [((1, 16, 24, 24), (1, 96, 24, 24))]
    assert skf.att_block_1.calls == [((1, 8, 48, 48), (1, 48, 48, 48))]


def test_every_se_output_is_used():
    class Zero(Recorder):
        def forward(self, x: Tensor, sem: Tensor) -> Tensor:
            return torch.zeros_like(x)

    torch.manual_seed(0)
    low = torch.rand(1, 3, 32, 32)
    plain = HWMNet(wf=8).eval()
    with torch.no_grad():
        reference = plain(low)
    for zeroed in (48, 96, 192):
        net = HWMNet(
            skf=True, wf=8, se_factory=lambda cs, c, z=zeroed: Zero(cs, c) if cs == z else Recorder(cs, c)
        ).eval()
        net.load_state_dict(plain.state_dict())
        with torch.no_grad():
            assert not torch.allclose(net(low, priors(1, 32, 32)), reference), f"SE on F{zeroed} unused"


def test_skf_forward_backward_with_real_se_blocks():
    torch.manual_seed(0)
    net = HWMNet(skf=True, wf=8)
    low = torch.rand(2, 3, 37, 45)
    out = net(low, priors(2, 37, 45))
    assert out.shape == low.shape and torch.isfinite(out).all()
    out.mean().backward()
    for name in ("att_block_1", "att_block_2", "att_block_3"):
        grads = [p.grad for p in getattr(net, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name


def test_default_se_factory_is_the_gdfn_block():
    net = on_meta(skf=True, wf=8)
    build = partial(SemanticEmbedding, heads=2, ffn="gdfn", ffn_factor=2.66)
    with torch.device("meta"):
        expected = build(48, 8)
    assert isinstance(net.att_block_1, SemanticEmbedding) and net.att_block_1.ffn_kind == "gdfn"
    assert n_params(net.att_block_1) == n_params(expected)


def test_sem_contract(small):
    low = torch.rand(1, 3, 16, 16)
    skf = HWMNet(skf=True, wf=8).eval()
    with pytest.raises(ValueError, match="skf=True"):
        skf(low)
    with pytest.raises(ValueError, match="skf=False"):
        small(low, priors(1, 16, 16))
    with pytest.raises(ValueError, match="got 2 tensors"):
        skf(low, priors(1, 16, 16)[:2])
    with pytest.raises(ValueError, match="sem_channels"):
        on_meta(skf=True, sem_channels=(48, 96))

    with pytest.raises(TypeError, match="Priors"):
        skf(low, PriorsLike())


# ---------------------------------------------------------------------------------------------------
# Loss: the released Charbonnier, sqrt(d² + 1e-3²) averaged, is the registered baseline loss
# ---------------------------------------------------------------------------------------------------
def test_the_recipes_loss_is_hwmnets_charbonnier():
    from components.baseline_losses import build_baseline_loss
    from components.recipes import load_recipe

    term = load_recipe("hwmnet").losses["charbonnier"]
    loss = build_baseline_loss("charbonnier", **term.params)
    pred = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]])
    target = torch.tensor([[[[0.0, 0.0], [0.0, 0.25]]]])
    eps = 1e-3
    expected = (eps + math.sqrt(0.25 + eps**2) + math.sqrt(1.0 + eps**2) + eps) / 4
    assert term.weight == 1.0 and loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
