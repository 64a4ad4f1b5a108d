"""Released SKF checkpoints as registered enhancers, so the paper's rows can be re-measured.

``import_released`` turns an author-released file (``LOL_LLFlow_L_SKF.pth``, ``SNR_SKF_LOL.pth``,
``model_lol.pt``, ...) into what the pipeline trains: a registered MLflow model (enhancer + SKB) that
``skf evaluate``, ``skf enhance`` and ``skf export`` take like any other. The file is third-party: its
sha256 must be given (the authors publish none, so the operator pins what they downloaded) and is checked
before the file is decoded; it is read weights-only and loaded strictly (any missing, unexpected or
mis-shaped key fails, listed, and nothing is registered).

The SKB is built the way the released *test* runs it (the family's ``released_skb_settings``; LLFlow-SKF:
the log image, train-mode BN on one image at a time), so the registered model reproduces the released
numbers rather than this project's cleaner defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from components.errors import UserInputError
from components.weights import SHA256_HEX

__all__ = ["ReleasedImport", "import_released"]

EXPERIMENT = "released-checkpoints"


@dataclass(frozen=True)
class ReleasedImport:
    """What was registered: the model URI to evaluate, its run and what it holds."""

    model_uri: str
    run_id: str
    baseline: str
    tensors: int
    checkpoint_sha256: str
    skb: str | None


def _checked_sha256(value: str, what: str) -> str:
    digest = value.strip().lower()
    if not SHA256_HEX.fullmatch(digest):
        raise UserInputError(
            f"{what} must be a full sha256 (64 hex digits), got {value!r}; compute it with `sha256sum FILE`"
        )
    return digest


def import_released(
    baseline: str,
    checkpoint: str | os.PathLike[str],
    *,
    sha256: str,
    name: str,
    skf: bool = True,
    skb: str = "skb/hrnet-w48-pascal@1",
    skb_checkpoint: str | None = None,
    skb_settings: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
) -> ReleasedImport:
    """Load ``checkpoint`` strictly into ``baseline`` (with SE blocks when ``skf``) and register it as ``name``.

    ``skb_settings`` override the family's released test settings (``bn_mode``, ``input_transform``, ...);
    ``model`` overrides network sizes (a checkpoint of another size then fails with its keys listed).
    """
    from components.baselines import get_family
    from components.inference import Enhancer, make_spec
    from components.model_registry import log_enhancer
    from components.registry import create, resolved_spec
    from components.tracking import mlflow_client

    digest = _checked_sha256(sha256, "--sha256")
    family = get_family(baseline)
    overrides = dict(model or {})
    family.check_overrides(overrides)
    net = family.build(skf=skf, **overrides)
    tensors = family.load_official(net, checkpoint, expected_sha256=digest)  # verified, then strict
    semantic = None
    if skf:
        settings = {**family.released_skb_settings, **(skb_settings or {})}
        semantic = create(resolved_spec(skb), checkpoint=skb_checkpoint, device="cpu", **settings)
    enhancer = Enhancer(
        net, semantic, make_spec(family.spec, net, semantic, baseline_kwargs=overrides)
    ).eval()

    client = mlflow_client()  # the configured tracking URI (SKF_HOME / MLFLOW_TRACKING_URI)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    run_id = client.create_run(
        experiment_id, run_name=f"{family.name}{'-skf' if skf else ''} released"
    ).info.run_id
    try:
        params = {
            "component.baseline": family.spec,
            "released.checkpoint": os.fspath(checkpoint),
            "released.sha256": digest,
            "released.tensors": tensors,
            "skf.enabled": skf,
        }
        if semantic is not None:
            params.update(semantic.describe())
        for key, value in params.items():
            client.log_param(run_id, key, value)
        registered = log_enhancer(
            enhancer,
            run_id=run_id,
            dataset_version="released",
            protocol="none",
            metrics={},
            name=name,
            set_challenger=False,  # promotion needs an evaluation: `skf evaluate` then `skf promote`
        )
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return ReleasedImport(
        model_uri=f"models:/{name}/{registered.version}",
        run_id=run_id,
        baseline=family.spec,
        tensors=tensors,
        checkpoint_sha256=digest,
        skb=getattr(semantic, "spec", None),
    )
