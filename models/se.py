"""SE: the Semantic-aware Embedding module of SKF (channel-transposed cross-attention, skf-method.md §2).

Image features ``R`` (B×C×h×w) attend to semantic features ``S`` (B×Cs×hs×ws) across *channels*
(Restormer MDTA style): the query comes from the semantics, key and value from the image. Sub-module and
parameter names mirror the official ``TransformerBlock`` / ``TransformerBlock_1`` so the released SNR-,
DRBN- and LLFlow-SKF checkpoints load with ``strict=True``:

``conv1`` (Cs→C, bias), ``norm1.body.{weight,bias}``, ``attn.{temperature,kv,kv_dwconv,q,q_dwconv,
project_out}``, ``norm2.body.*``, ``ffn.*`` and, for the bottleneck variant, ``conv2``/``conv3``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FFNKind = Literal["gdfn", "dual-gated"]
GeluKind = Literal["exact", "tanh"]

__all__ = [
    "ChannelLayerNorm",
    "DualGatedFeedForward",
    "GatedDConvFeedForward",
    "SemanticEmbedding",
    "SemanticEmbeddingBottleneck",
    "TransposedCrossAttention",
]


def _gelu_approximate(kind: GeluKind) -> str:
    """Map our GELU name to ``F.gelu``'s ``approximate`` argument (a string keeps modules picklable)."""
    if kind not in ("exact", "tanh"):
        raise ValueError(f"gelu must be 'exact' or 'tanh', got {kind!r}")
    return "none" if kind == "exact" else "tanh"


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 -> fp32 for numerically sensitive steps; fp32/fp64 unchanged."""
    return torch.promote_types(dtype, torch.float32)


class ChannelLayerNorm(nn.Module):
    """Per-pixel LayerNorm over channels of a B×C×H×W map (biased variance, eps 1e-5).

    The parameters live in ``body`` (an ``nn.LayerNorm``) to match the official ``norm*.body.*`` keys.
    Statistics are computed in fp32 so the block is safe under fp16/bf16 autocast.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.body = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        dtype = _at_least_fp32(x.dtype)
        y = F.layer_norm(
            x.permute(0, 2, 3, 1).to(dtype),
            self.body.normalized_shape,
            self.body.weight.to(dtype),
            self.body.bias.to(dtype),
            self.body.eps,
        )
        return y.permute(0, 3, 1, 2).to(x.dtype)


class TransposedCrossAttention(nn.Module):
    """Channel-wise (d×d) cross attention: Q from the semantics, K and V from the image.

    ``q_dwconv`` is a *full* 3×3 conv in the official code despite its name; kept for checkpoint parity.
    Logits and softmax are computed in fp32 (normalisation eps 1e-12 underflows in fp16).
    """

    def __init__(self, channels: int, heads: int = 2) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.kv = nn.Conv2d(channels, channels * 2, 1, bias=False)
        self.kv_dwconv = nn.Conv2d(channels * 2, channels * 2, 3, padding=1, groups=channels * 2, bias=False)
        self.q = nn.Conv2d(channels, channels, 1, bias=False)
        self.q_dwconv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.project_out = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: Tensor, sem: Tensor) -> Tensor:
        b, c, h, w = x.shape
        k, v = self.kv_dwconv(self.kv(x)).chunk(2, dim=1)
        q = self.q_dwconv(self.q(sem))
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        dtype = _at_least_fp32(q.dtype)
        q = F.normalize(q.to(dtype), dim=-1)
        k = F.normalize(k.to(dtype), dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature.to(dtype)).softmax(dim=-1)
        out = (attn.to(v.dtype) @ v).reshape(b, c, h, w)
        return self.project_out(out)


class GatedDConvFeedForward(nn.Module):
    """Restormer GDFN: ``project_out(GELU(U1) * U2)`` with ``[U1; U2] = dwconv(project_in(x))``."""

    def __init__(self, channels: int, factor: float = 2.66, gelu: GeluKind = "exact") -> None:
        super().__init__()
        hidden = int(channels * factor)
        self.approximate = _gelu_approximate(gelu)
        self.project_in = nn.Conv2d(channels, hidden * 2, 1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        u1, u2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(u1, approximate=self.approximate) * u2)


class DualGatedFeedForward(nn.Module):
    """SNR-SKF FFN: ``project_out(GELU(project_in_R(x)) * GELU(project_in_S(y)))``.

    The released module also owns ``project_in`` (C→Hd) and ``dwconv`` (2Hd depthwise 3×3), which its
    forward never uses. They are kept so official checkpoints load strictly, but frozen
    (``requires_grad=False``) so optimisers and DDP ignore them.
    """

    def __init__(self, channels: int, factor: float = 2.66, gelu: GeluKind = "exact") -> None:
        super().__init__()
        hidden = int(channels * factor)
        self.approximate = _gelu_approximate(gelu)
        self.project_in = nn.Conv2d(channels, hidden, 1, bias=False)
        self.project_in_R = nn.Conv2d(channels, hidden, 1, bias=False)
        self.project_in_S = nn.Conv2d(channels, hidden, 1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, channels, 1, bias=False)
        self.project_in.requires_grad_(False)
        self.dwconv.requires_grad_(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.project_out(
            F.gelu(self.project_in_R(x), approximate=self.approximate)
            * F.gelu(self.project_in_S(y), approximate=self.approximate)
        )


class SemanticEmbedding(nn.Module):
    """SE block (official ``TransformerBlock``): embeds semantic features into image features.

    Args:
        sem_channels: channels ``Cs`` of the semantic feature (HRNet stage feature or logits).
        channels: channels ``C`` of the host image feature; the output has the same shape as ``x``.
        heads: attention heads (official: 2).
        ffn: ``"gdfn"`` (LLFlow, DRBN) or ``"dual-gated"`` (SNR).
        ffn_factor: hidden expansion, ``Hd = int(C * ffn_factor)``.
        gelu: ``"exact"`` or ``"tanh"`` (DRBN's own GELU is the tanh approximation).

    Note the residual of the attention starts from the *normalised* image feature, as released.
    """

    def __init__(
        self,
        sem_channels: int,
        channels: int,
        heads: int = 2,
        ffn: FFNKind = "gdfn",
        ffn_factor: float = 2.66,
        gelu: GeluKind = "exact",
    ) -> None:
        super().__init__()
        if ffn not in ("gdfn", "dual-gated"):
            raise ValueError(f"ffn must be 'gdfn' or 'dual-gated', got {ffn!r}")
        self.sem_channels = sem_channels
        self.channels = channels
        self.ffn_kind = ffn
        self.conv1 = nn.Conv2d(sem_channels, channels, 1)
        self.norm1 = ChannelLayerNorm(channels)
        self.attn = TransposedCrossAttention(channels, heads)
        self.norm2 = ChannelLayerNorm(channels)
        self.ffn: nn.Module
        if ffn == "gdfn":
            self.ffn = GatedDConvFeedForward(channels, ffn_factor, gelu)
        else:
            self.ffn = DualGatedFeedForward(channels, ffn_factor, gelu)

    def _check(self, x: Tensor, sem: Tensor, channels: int) -> None:
        if x.dim() != 4 or sem.dim() != 4 or x.shape[0] != sem.shape[0]:
            raise ValueError(
                f"{type(self).__name__} expects 4-D x and sem with the same batch size, got "
                f"x {tuple(x.shape)} and sem {tuple(sem.shape)}"
            )
        if x.shape[1] != channels or sem.shape[1] != self.sem_channels:
            raise ValueError(
                f"{type(self).__name__} was built for x with {channels} and sem with {self.sem_channels} "
                f"channels, got {x.shape[1]} and {sem.shape[1]}; check the SE insertion point"
            )

    def _embed(self, x: Tensor, sem: Tensor) -> Tensor:
        if sem.shape[-2:] != x.shape[-2:]:  # hosts usually pass priors already aligned (fit_prior)
            sem = F.interpolate(sem, size=x.shape[-2:], mode="nearest")
        sem = self.norm1(self.conv1(sem))
        x = self.norm1(x)
        x = x + self.attn(x, sem)
        if self.ffn_kind == "gdfn":
            return x + self.ffn(self.norm2(x))
        return x + self.ffn(self.norm2(x), self.norm2(sem))

    def forward(self, x: Tensor, sem: Tensor) -> Tensor:
        """``x``: B×C×h×w image feature; ``sem``: B×Cs×hs×ws, nearest-resized to h×w here."""
        self._check(x, sem, self.channels)
        return self._embed(x, sem)


class SemanticEmbeddingBottleneck(SemanticEmbedding):
    """LLFlow-L SE block (official ``TransformerBlock_1``): the block runs at ``inner`` channels.

    ``conv2`` projects the image feature C→inner, ``conv1`` the semantics Cs→inner, ``conv3`` maps the
    result back inner→C. GDFN with factor 1 and no skip around the projections, as released.
    """

    def __init__(
        self,
        sem_channels: int,
        channels: int = 320,
        inner: int = 192,
        heads: int = 2,
        ffn_factor: float = 1.0,
        gelu: GeluKind = "exact",
    ) -> None:
        super().__init__(sem_channels, inner, heads=heads, ffn="gdfn", ffn_factor=ffn_factor, gelu=gelu)
        self.outer_channels = channels
        self.conv2 = nn.Conv2d(channels, inner, 1)
        self.conv3 = nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, sem: Tensor) -> Tensor:
        self._check(x, sem, self.outer_channels)
        return self.conv3(self._embed(self.conv2(x), sem))
