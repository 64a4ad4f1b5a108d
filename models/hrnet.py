"""HRNetV2 semantic-segmentation network (the SKF "Semantic Knowledge Bank" backbone).

Our own implementation of the architecture of the official HRNet-Semantic-Segmentation ``seg_hrnet``
model: module and parameter names follow the official state dict exactly (``conv1``, ``layer1.#``,
``transition1..3``, ``stage2..4.#.branches/fuse_layers``, ``last_layer``) so that the released
PASCAL-Context checkpoint loads strictly. The W48 / 59-class configuration has 65,888,219 parameters.

The forward pass returns the four stage-4 feature maps and the head logits at 1/4 resolution; the
full-resolution logits, probabilities and label map are derived on demand by :func:`upsample_logits`,
:func:`class_probabilities` and :func:`label_map` (cheap, and never worth caching).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BlockType = Literal["basic", "bottleneck"]
InitScheme = Literal["official", "kaiming"]

_EXPANSION: dict[str, int] = {"basic": 1, "bottleneck": 4}


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageConfig:
    """One HRNet stage: ``num_modules`` high-resolution modules over ``len(num_channels)`` branches."""

    num_modules: int
    num_blocks: tuple[int, ...]
    num_channels: tuple[int, ...]
    block: BlockType = "basic"

    def __post_init__(self) -> None:
        if self.block not in _EXPANSION:
            raise ValueError(f"unknown block type {self.block!r}; expected one of {sorted(_EXPANSION)}")
        if len(self.num_blocks) != len(self.num_channels):
            raise ValueError(
                f"num_blocks {self.num_blocks} and num_channels {self.num_channels} must have one entry per branch"
            )
        if self.num_modules < 1 or min(self.num_blocks) < 1 or min(self.num_channels) < 1:
            raise ValueError(f"stage sizes must be positive: {self}")

    @property
    def num_branches(self) -> int:
        return len(self.num_channels)

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(c * _EXPANSION[self.block] for c in self.num_channels)


@dataclass(frozen=True)
class HRNetConfig:
    """Architecture of an HRNetV2 segmenter (the official yaml ``MODEL.EXTRA`` plus the head)."""

    stage1: StageConfig
    stage2: StageConfig
    stage3: StageConfig
    stage4: StageConfig
    num_classes: int = 59
    in_channels: int = 3
    stem_channels: int = 64
    final_conv_kernel: int = 1
    align_corners: bool = True
    bn_momentum: float = 0.1
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.stage1.num_branches != 1 or self.stage1.num_modules != 1:
            raise ValueError("stage1 is a single residual layer: one module, one branch")
        for prev, cur in ((self.stage1, self.stage2), (self.stage2, self.stage3), (self.stage3, self.stage4)):
            if cur.num_branches != prev.num_branches + 1:
                raise ValueError("each HRNet stage adds exactly one lower-resolution branch")
        if self.final_conv_kernel not in (1, 3):
            raise ValueError("final_conv_kernel must be 1 or 3")

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """Channels of the stage-4 outputs F0..F3 (strides 4, 8, 16, 32)."""
        return self.stage4.out_channels

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable description (used in fingerprints and run parameters)."""
        data = asdict(self)
        data.pop("name")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HRNetConfig:
        stages = {
            k: StageConfig(
                num_modules=int(v["num_modules"]),
                num_blocks=tuple(v["num_blocks"]),
                num_channels=tuple(v["num_channels"]),
                block=v.get("block", "basic"),
            )
            for k, v in data.items()
            if k.startswith("stage")
        }
        rest = {k: v for k, v in data.items() if not k.startswith("stage")}
        return cls(**stages, **rest)


def hrnet_w48_config(num_classes: int = 59) -> HRNetConfig:
    """HRNetV2-W48 as in ``seg_hrnet_w48_cls59_480x480_*.yaml`` (PASCAL-Context, 59 classes)."""
    return HRNetConfig(
        stage1=StageConfig(1, (4,), (64,), "bottleneck"),
        stage2=StageConfig(1, (4, 4), (48, 96)),
        stage3=StageConfig(4, (4, 4, 4), (48, 96, 192)),
        stage4=StageConfig(3, (4, 4, 4, 4), (48, 96, 192, 384)),
        num_classes=num_classes,
        name="w48",
    )


def hrnet_w18_small_config(num_classes: int = 59) -> HRNetConfig:
    """A small W18 variant (one module per stage, one block per branch) for fast CPU tests and demos."""
    return HRNetConfig(
        stage1=StageConfig(1, (1,), (32,), "bottleneck"),
        stage2=StageConfig(1, (1, 1), (18, 36)),
        stage3=StageConfig(1, (1, 1, 1), (18, 36, 72)),
        stage4=StageConfig(1, (2, 2, 2, 2), (18, 36, 72, 144)),
        num_classes=num_classes,
        name="w18-small",
    )


def hrnet_w48_lite_config(num_classes: int = 59) -> HRNetConfig:
    """W48 channel widths (48/96/192/384) with one module per stage and one block per branch.

    Its priors have exactly the channel counts of the W48 SKB (F0 48, F1 96, F2 192, 59 classes), so it is a
    drop-in for the baselines' SE blocks in tests and the CPU demo, at a fraction of the compute.
    """
    return HRNetConfig(
        stage1=StageConfig(1, (1,), (64,), "bottleneck"),
        stage2=StageConfig(1, (1, 1), (48, 96)),
        stage3=StageConfig(1, (1, 1, 1), (48, 96, 192)),
        stage4=StageConfig(1, (1, 1, 1, 1), (48, 96, 192, 384)),
        num_classes=num_classes,
        name="w48-lite",
    )


# --------------------------------------------------------------------------------------------------
# Building blocks (attribute names are the official state-dict names)
# --------------------------------------------------------------------------------------------------
def _bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=momentum)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, momentum: float, relu: bool) -> nn.Sequential:
    """``Sequential(conv (no bias), BN[, ReLU])`` -- keys ``0.weight`` and ``1.*``."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        _bn(cout, momentum),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, momentum: float, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, padding=1, bias=False)
        self.bn1 = _bn(planes, momentum)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = _bn(planes, momentum)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity, inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, momentum: float, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = _bn(planes, momentum)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = _bn(planes, momentum)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = _bn(planes * self.expansion, momentum)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity, inplace=True)


_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _residual_layer(
    block: BlockType, cin: int, planes: int, num_blocks: int, momentum: float
) -> nn.Sequential:
    """A stack of residual blocks; the first gets a 1x1 projection when the width changes."""
    cls = _BLOCKS[block]
    cout = planes * cls.expansion
    downsample = _conv_bn(cin, cout, 1, 1, momentum, relu=False) if cin != cout else None
    layers = [cls(cin, planes, momentum, downsample)]
    layers += [cls(cout, planes, momentum) for _ in range(num_blocks - 1)]
    return nn.Sequential(*layers)


def _transition(prev: Sequence[int], cur: Sequence[int], momentum: float) -> nn.ModuleList:
    """Adapt branch widths between stages and spawn the new lowest-resolution branch.

    Entries whose width does not change are ``None`` so the official indices (and keys) are kept.
    """
    layers: list[nn.Module | None] = []
    for i, cout in enumerate(cur):
        if i < len(prev):
            layers.append(None if prev[i] == cout else _conv_bn(prev[i], cout, 3, 1, momentum, relu=True))
        else:
            steps = i + 1 - len(prev)
            cin = prev[-1]
            chain = [
                _conv_bn(cin, cout if s == steps - 1 else cin, 3, 2, momentum, relu=True)
                for s in range(steps)
            ]
            layers.append(nn.Sequential(*chain))
    return nn.ModuleList(layers)


def _fuse_layer(i: int, j: int, channels: Sequence[int], momentum: float) -> nn.Module | None:
    """Path from branch ``j`` into branch ``i`` (see docs/method.md §2.1)."""
    if j == i:
        return None
    if j > i:  # 1x1 conv to C_i; the bilinear upsampling happens in forward
        return _conv_bn(channels[j], channels[i], 1, 1, momentum, relu=False)
    steps = i - j  # chain of stride-2 3x3 convs; only the last changes width and has no ReLU
    return nn.Sequential(
        *(
            _conv_bn(
                channels[j],
                channels[i] if k == steps - 1 else channels[j],
                3,
                2,
                momentum,
                relu=k < steps - 1,
            )
            for k in range(steps)
        )
    )


class HighResolutionModule(nn.Module):
    """Parallel residual branches followed by all-to-all multi-resolution fusion (sum + ReLU)."""

    def __init__(self, stage: StageConfig, in_channels: Sequence[int], momentum: float, align_corners: bool):
        super().__init__()
        self.align_corners = align_corners
        self.branches = nn.ModuleList(
            _residual_layer(stage.block, cin, planes, n, momentum)
            for cin, planes, n in zip(in_channels, stage.num_channels, stage.num_blocks, strict=True)
        )
        out = stage.out_channels
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(_fuse_layer(i, j, out, momentum) for j in range(len(out))) for i in range(len(out))
        )

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        fused = []
        for i, paths in enumerate(self.fuse_layers):
            size = xs[i].shape[-2:]
            y: Tensor | None = None
            for j, path in enumerate(paths):
                if path is None:
                    term = xs[j]
                elif j > i:
                    term = F.interpolate(
                        path(xs[j]), size=size, mode="bilinear", align_corners=self.align_corners
                    )
                else:
                    term = path(xs[j])
                y = term if y is None else y + term
            fused.append(F.relu(y))
        return fused


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------
class HRNetOutput(NamedTuple):
    """``features`` = stage-4 maps (F0..F3 at strides 4, 8, 16, 32); ``logits`` = head output at 1/4."""

    features: tuple[Tensor, ...]
    logits: Tensor


class HRNet(nn.Module):
    """HRNetV2 segmenter whose ``state_dict`` keys equal the official ``seg_hrnet`` ones."""

    def __init__(self, config: HRNetConfig):
        super().__init__()
        self.config = config
        m = config.bn_momentum
        stem = config.stem_channels
        self.conv1 = nn.Conv2d(config.in_channels, stem, 3, stride=2, padding=1, bias=False)
        self.bn1 = _bn(stem, m)
        self.conv2 = nn.Conv2d(stem, stem, 3, stride=2, padding=1, bias=False)
        self.bn2 = _bn(stem, m)
        s1 = config.stage1
        self.layer1 = _residual_layer(s1.block, stem, s1.num_channels[0], s1.num_blocks[0], m)

        prev: tuple[int, ...] = s1.out_channels
        for idx, stage in enumerate((config.stage2, config.stage3, config.stage4), start=1):
            setattr(self, f"transition{idx}", _transition(prev, stage.out_channels, m))
            # Every module (the first included: it reads the transition outputs) sees the stage widths.
            modules = [
                HighResolutionModule(stage, stage.out_channels, m, config.align_corners)
                for _ in range(stage.num_modules)
            ]
            setattr(self, f"stage{idx + 1}", nn.Sequential(*modules))
            prev = stage.out_channels

        head = sum(config.feature_channels)
        k = config.final_conv_kernel
        self.last_layer = nn.Sequential(
            nn.Conv2d(head, head, 1),
            _bn(head, m),
            nn.ReLU(inplace=True),
            nn.Conv2d(head, config.num_classes, k, padding=k // 2),
        )
        self.init_weights()

    # -- initialisation -------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, scheme: InitScheme = "official", generator: torch.Generator | None = None) -> None:
        """Re-initialise all weights deterministically from ``generator``.

        ``official`` draws convolutions from N(0, 0.001) as the reference code does before loading the
        checkpoint (activations then nearly vanish); ``kaiming`` uses He-normal convolutions with the
        last BN of every residual block zeroed, which keeps activations O(1) and gives spatially varying
        features and labels -- the useful choice for a randomly initialised smoke-test SKB.
        """
        if scheme not in ("official", "kaiming"):
            raise ValueError(f"unknown init scheme {scheme!r}; expected 'official' or 'kaiming'")
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                if scheme == "official":
                    mod.weight.normal_(0.0, 0.001, generator=generator)
                else:
                    fan_in = mod.weight[0].numel()
                    mod.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
                if mod.bias is not None:
                    bound = 1.0 / mod.weight[0].numel() ** 0.5
                    mod.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(mod, nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.weight.fill_(1.0)
                mod.bias.zero_()
        if scheme == "kaiming":
            for mod in self.modules():
                if isinstance(mod, BasicBlock):
                    mod.bn2.weight.zero_()
                elif isinstance(mod, Bottleneck):
                    mod.bn3.weight.zero_()

    # -- forward --------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Stage-4 multi-resolution features [F0, F1, F2, F3]."""
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        xs = [self.layer1(x)]
        for idx in (1, 2, 3):
            transition: nn.ModuleList = getattr(self, f"transition{idx}")
            inputs = []
            for i, t in enumerate(transition):
                src = xs[min(i, len(xs) - 1)]  # a new branch grows from the lowest-resolution one
                inputs.append(src if t is None else t(src))
            xs = getattr(self, f"stage{idx + 1}")(inputs)
        return xs

    def forward_head(self, features: Sequence[Tensor]) -> Tensor:
        """Segmentation logits at 1/4 resolution from the four feature maps."""
        size = features[0].shape[-2:]
        ups = [features[0]] + [
            F.interpolate(f, size=size, mode="bilinear", align_corners=self.config.align_corners)
            for f in features[1:]
        ]
        return self.last_layer(torch.cat(ups, dim=1))

    def forward(self, x: Tensor) -> HRNetOutput:
        features = self.forward_features(x)
        return HRNetOutput(tuple(features), self.forward_head(features))


# --------------------------------------------------------------------------------------------------
# Derived outputs
# --------------------------------------------------------------------------------------------------
def upsample_logits(
    logits: Tensor, size: tuple[int, int] | None = None, *, scale: int = 4, align_corners: bool = True
) -> Tensor:
    """Full-resolution logits: bilinear x``scale`` (as the official head does), then crop to ``size``.

    The official code upsamples the 1/4 logits to exactly ``(4*h, 4*w)``; an image of size ``size``
    whose 1/4 grid is ``(h, w) = (ceil(H/4), ceil(W/4))`` then takes the top-left ``H x W`` window.
    """
    h, w = logits.shape[-2:]
    full = F.interpolate(logits, size=(h * scale, w * scale), mode="bilinear", align_corners=align_corners)
    if size is None:
        return full
    height, width = size
    if -(-height // scale) != h or -(-width // scale) != w:
        raise ValueError(
            f"size {tuple(size)} does not match logits grid {(h, w)} at 1/{scale}: "
            f"expected ceil(H/{scale}) == {h} and ceil(W/{scale}) == {w}"
        )
    return full[..., :height, :width]


def class_probabilities(logits: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Softmax over classes of the full-resolution logits (computed in float32)."""
    return torch.softmax(upsample_logits(logits.float(), size), dim=1)


def labels_of(full_logits: Tensor) -> Tensor:
    """Hard argmax over the classes of full-resolution logits (B, H, W), int64.

    ``max(dim=1).indices`` is argmax (the first maximum on ties) and is faster than ``argmax`` on NCHW maps.
    """
    return full_logits.max(dim=1).indices


def label_map(logits: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Hard argmax class map (B, H, W), int64."""
    return labels_of(upsample_logits(logits.float(), size))


def build_hrnet(name: str = "w48", num_classes: int = 59) -> HRNet:
    """Instantiate a preset (``w48``, ``w48-lite`` or ``w18-small``)."""
    presets = {
        "w48": hrnet_w48_config,
        "w48-lite": hrnet_w48_lite_config,
        "w18-small": hrnet_w18_small_config,
    }
    if name not in presets:
        raise ValueError(f"unknown HRNet preset {name!r}; available: {sorted(presets)}")
    return HRNet(presets[name](num_classes))
