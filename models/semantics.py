"""The checks and alignment every SKF network applies to its ``sem`` argument, written once.

A network built with SE blocks needs the SKB's features (F0, F1, F2) as plain tensors; one built without
has no use for them; the SKB's ``Priors`` object (whose length is the batch size) is the commonest mistake.
:func:`checked_sem` says which, in the same words for every network. :func:`align_priors` fits each prior
to its host feature when the network padded its input (:func:`models.padding.fit_prior`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from models.padding import fit_prior, scaled_size

__all__ = ["align_priors", "checked_sem"]


def checked_sem(
    network: str, skf: bool, sem: Sequence[Tensor] | None, count: int = 3
) -> Sequence[Tensor] | None:
    """``sem`` after checking it suits a network named ``network`` built with ``skf`` (``None`` for plain)."""
    if sem is None:
        if skf:
            raise ValueError(
                f"{network} was built with skf=True (SKF) and needs sem=(F0, F1, F2); "
                "build it with skf=False for the plain baseline"
            )
        return None
    if not skf:
        raise ValueError(
            f"{network} was built with skf=False and has no SE blocks; pass sem=None or build with skf=True"
        )
    if hasattr(sem, "logits"):  # the SKB's Priors object: its length is the batch size, not 3 maps
        raise TypeError(
            f"{network} takes sem=(F0, F1, F2) tensors, not a Priors object; map it with the family's "
            "sem_inputs(priors, size) (components.baselines)"
        )
    if len(sem) != count:
        raise ValueError(f"{network} expects sem=(F0, F1, F2), got {len(sem)} tensors")
    return sem


def align_priors(
    sem: Sequence[Tensor], size: tuple[int, int], padded: Sequence[int], scales: Sequence[int]
) -> list[Tensor]:
    """Each prior fitted to its host at 1/``scale`` of an image of ``size`` padded to ``padded``."""
    return [
        fit_prior(s, scaled_size(size, k), (padded[0] // k, padded[1] // k))
        for s, k in zip(sem, scales, strict=True)
    ]
