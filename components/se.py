"""Registered SE (Semantic-aware Embedding) factories; the networks live in :mod:`models.se`.

Each builder takes the constructor keyword arguments, e.g.
``create("se/restormer-xattn-gdfn@1", sem_channels=96, channels=32, gelu="tanh")`` for DRBN's fuseblk_1.
"""

from __future__ import annotations

from components.registry import register
from models.se import GeluKind, SemanticEmbedding, SemanticEmbeddingBottleneck

__all__ = ["build_bottleneck", "build_dual_gated", "build_gdfn"]


@register(
    "se/restormer-xattn-gdfn@1",
    description="SE cross-attention block with GDFN FFN (LLFlow-S, DRBN with gelu='tanh')",
)
def build_gdfn(
    sem_channels: int,
    channels: int,
    heads: int = 2,
    ffn_factor: float = 2.66,
    gelu: GeluKind = "exact",
) -> SemanticEmbedding:
    return SemanticEmbedding(
        sem_channels, channels, heads=heads, ffn="gdfn", ffn_factor=ffn_factor, gelu=gelu
    )


@register(
    "se/restormer-xattn-dual-gated@1",
    description="SE cross-attention block with the dual-gated FFN of SNR-SKF",
)
def build_dual_gated(
    sem_channels: int,
    channels: int,
    heads: int = 2,
    ffn_factor: float = 2.66,
    gelu: GeluKind = "exact",
) -> SemanticEmbedding:
    return SemanticEmbedding(
        sem_channels, channels, heads=heads, ffn="dual-gated", ffn_factor=ffn_factor, gelu=gelu
    )


@register(
    "se/restormer-xattn-bottleneck@1",
    description="LLFlow-L SE block run at a reduced inner width (official TransformerBlock_1)",
)
def build_bottleneck(
    sem_channels: int,
    channels: int = 320,
    inner: int = 192,
    heads: int = 2,
    ffn_factor: float = 1.0,
    gelu: GeluKind = "exact",
) -> SemanticEmbeddingBottleneck:
    return SemanticEmbeddingBottleneck(
        sem_channels, channels, inner=inner, heads=heads, ffn_factor=ffn_factor, gelu=gelu
    )
