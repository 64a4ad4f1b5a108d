"""Registered baseline enhancement networks, with or without SKF's SE blocks.

``create("baseline/drbn@1", skf=True)`` returns :class:`models.drbn.DRBN` with ``recur4.fuseblk_{1,2,3}``;
``skf=False`` the plain DRBN without any SE parameter. Same for ``baseline/snr-net@1``
(:class:`models.snr_net.SNRNet`, ``att_block_{1,2,3}``). The SKB (HRNet) is never part of the returned
module: priors are passed to ``forward`` (see each network's ``sem_inputs``). Training defaults live in
the recipes (``configs/recipes/<name>.yaml``, :mod:`components.recipes`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from components.checkpoints import load_checkpoint, load_strict, strip_prefixes
from components.registry import register
from models.drbn import DRBN
from models.snr_net import SNRNet

__all__ = ["build_drbn", "build_snr_net", "load_official_weights"]


@register("baseline/drbn@1", description="DRBN (CVPR 2020); skf=True adds SE blocks to recurrence 4")
def build_drbn(skf: bool = True, **overrides: Any) -> DRBN:
    """DRBN (G0=16, 4 recurrences). ``overrides``: ``g0``, ``growth``, ``n_layers``, ``in_channels``,
    ``se_kwargs``."""
    return DRBN(seg=skf, **overrides)


@register(
    "baseline/snr-net@1", description="SNR-aware network (CVPR 2022); skf=True adds SE blocks at 3 scales"
)
def build_snr_net(skf: bool = True, **overrides: Any) -> SNRNet:
    """SNR-Net (nf 64, 1+1 residual blocks, 6-layer patch transformer). ``overrides``: ``nf``,
    ``front_blocks``, ``back_blocks``, ``light_blocks``, ``n_layers``, ``heads``, ``d_inner``,
    ``mask_threshold``, ``se_kwargs``."""
    return SNRNet(seg=skf, **overrides)


def load_official_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    expected_sha256: str | None = None,
) -> int:
    """Load a released DRBN-SKF / SNR-SKF checkpoint (or its plain baseline) strictly into ``model``.

    ``source``: a path/URI (``model_lol.pt``, ``SNR_SKF_LOL.pth``; a top-level ``state_dict`` entry is
    descended into) or an in-memory state dict. ``module.`` prefixes (DataParallel) are stripped. Any
    missing, unexpected or mis-shaped key raises :class:`components.checkpoints.StateDictMismatchError`
    — e.g. an SKF checkpoint into a model built with ``skf=False`` lists the ``att_block_*`` keys.
    Returns the number of tensors loaded.
    """
    if isinstance(source, Mapping):
        state_dict, label = strip_prefixes(source, ("module.",)), "state dict"
    else:
        loaded = load_checkpoint(source, expected_sha256=expected_sha256, prefixes=("module.",))
        state_dict, label = loaded.state_dict, loaded.source
    return load_strict(model, state_dict, source=label)
