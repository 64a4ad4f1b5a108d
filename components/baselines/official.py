"""Loading the released DRBN-SKF / SNR-SKF checkpoints (or their plain baselines) strictly."""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor, nn

from components.checkpoints import load_checkpoint, load_strict, strip_prefixes

__all__ = ["load_official_weights"]


def load_official_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    expected_sha256: str | None = None,
    prefixes: tuple[str, ...] = ("module.",),
) -> int:
    """Load a released checkpoint strictly into ``model``; returns the number of tensors loaded.

    ``source``: a path/URI (``model_lol.pt``, ``SNR_SKF_LOL.pth``; a top-level ``state_dict`` entry is
    descended into) or an in-memory state dict. ``prefixes`` (DataParallel's ``module.``) are stripped. Any
    missing, unexpected or mis-shaped key raises :class:`components.checkpoints.StateDictMismatchError`
    — e.g. an SKF checkpoint into a model built with ``skf=False`` lists the SE blocks' keys. Weights are
    read weights-only (never unpickled as code).
    """
    if isinstance(source, Mapping):
        state_dict, label = strip_prefixes(source, prefixes), "state dict"
    else:
        loaded = load_checkpoint(source, expected_sha256=expected_sha256, prefixes=prefixes)
        state_dict, label = loaded.state_dict, loaded.source
    return load_strict(model, state_dict, source=label)
