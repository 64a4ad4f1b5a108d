"""MLflow model registry for enhancers: log as pyfunc, register, and promote ``challenger`` -> ``champion``.

Logging (:func:`log_enhancer`): the enhancer is an MLflow pyfunc logged *from code*
(:mod:`components.pyfunc_model`), with the project's ``components``/``models`` packages bundled as
``code_paths`` and three artifacts: ``enhancer_spec.json`` (:class:`~components.inference.EnhancerSpec`:
resolved component versions, SKB settings and fingerprint), ``enhancer.safetensors`` and
``skb.safetensors``, plus ``model_card.json`` (dataset version, evaluation protocol, metrics). No model
object is pickled. Signature: input and output are float32 tensors (-1, -1, -1, 3) -- a batch of RGB
images in [0, 1], channels last; a small input example is logged with it. The new version gets alias
``challenger``, tags ``skf.*`` and a description (baseline, SKB, dataset version, protocol, metrics); the
registered model's description names what its newest version is.

Promotion (:func:`promote`) moves ``champion`` only if the challenger was evaluated on the champion's
dataset version and protocol, its primary metric beats the champion's by more than the policy margin,
no guard metric regresses beyond its tolerance, and its SKB is pretrained (never waived). The first
pretrained challenger becomes champion when there is none. Every decision is written as ``skf.promotion.*``
tags on the model version and on its run.

Concurrency: promotion and the challenger alias move under :func:`registry_lock` -- a PostgreSQL
session advisory lock when the catalog is PostgreSQL (shared by all hosts), else an OS file lock under
``$SKF_HOME/locks`` (all processes of one host) -- and the aliases are re-read *after* the lock is held
(compare-and-set), so two flows finishing together cannot both promote or overwrite a newer alias.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from components.errors import SKFError
from components.inference import Enhancer, EnhancerSpec, load_enhancer_dir, save_enhancer
from components.serving import ARTIFACT_CARD, ARTIFACT_NET, ARTIFACT_SKB, ARTIFACT_SPEC

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
MODEL_ARTIFACT_NAME = "enhancer"
PACKAGE_PATH = "enhancer-package"
TAG = "skf."
_PROJECT_ROOT = Path(__file__).resolve().parents[1]
_CODE_PACKAGES = ("components", "models")
_PIP_PACKAGES = ("torch", "numpy", "safetensors", "mlflow")
_MAX_TAG = 5000


# --------------------------------------------------------------------------------------------------
# Policy and decisions
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Guard:
    """A metric that must not get worse than the champion's by more than ``tolerance``."""

    metric: str
    higher_is_better: bool
    tolerance: float


@dataclasses.dataclass(frozen=True)
class PromotionPolicy:
    """When a challenger replaces the champion.

    ``margin``: the primary metric must beat the champion's by strictly more than this (0: any gain).
    A guard metric that the champion has but the challenger lacks blocks the promotion; a guard
    neither has (e.g. LPIPS unavailable offline) is skipped and the skip is recorded.
    """

    primary: str = "psnr"
    higher_is_better: bool = True
    margin: float = 0.0
    guards: tuple[Guard, ...] = (Guard("ssim", True, 0.005), Guard("lpips", False, 0.005))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromotionPolicy:
        data = dict(data)
        guards = tuple(Guard(**g) for g in data.pop("guards", ()))
        return cls(**data, guards=guards)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """What promotion needs to know about one model version (read from its ``skf.*`` tags)."""

    version: str
    dataset_version: str | None
    protocol: str | None
    skb_pretrained: bool
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class PromotionDecision:
    name: str
    version: str
    promoted: bool
    reason: str
    champion_before: str | None
    champion_after: str | None
    checks: tuple[str, ...] = ()
    policy: dict[str, Any] = dataclasses.field(default_factory=dict)
    decided_at: str = ""

    def tags(self) -> dict[str, str]:
        return {
            f"{TAG}promotion.decision": "promoted" if self.promoted else "rejected",
            f"{TAG}promotion.reason": self.reason[:_MAX_TAG],
            f"{TAG}promotion.champion_before": self.champion_before or "none",
            f"{TAG}promotion.champion_after": self.champion_after or "none",
            f"{TAG}promotion.checks": " | ".join(self.checks)[:_MAX_TAG],
            f"{TAG}promotion.policy": json.dumps(self.policy, sort_keys=True)[:_MAX_TAG],
            f"{TAG}promotion.decided_at": self.decided_at,
            f"{TAG}promotion.model": f"{self.name}/{self.version}",
        }

    def to_markdown(self) -> str:
        verdict = "**promoted to champion**" if self.promoted else "**not promoted**"
        lines = [
            f"### Promotion of `{self.name}` version {self.version}: {verdict}",
            "",
            f"Reason: {self.reason}",
            "",
            f"- champion before: {self.champion_before or 'none'}",
            f"- champion after: {self.champion_after or 'none'}",
            f"- policy: `{json.dumps(self.policy, sort_keys=True)}`",
        ]
        if self.checks:
            lines += ["", "Checks:", ""] + [f"- {c}" for c in self.checks]
        return "\n".join(lines) + "\n"


class RegistryError(SKFError, RuntimeError):
    """A registry operation could not be carried out (missing version, conflicting writer)."""


class ModelNotFoundError(SKFError, LookupError):
    """A model URI, name, alias, version or run names nothing in MLflow (the message lists what exists)."""

    exit_code = 2


# --------------------------------------------------------------------------------------------------
# Looking models up (one-line errors that list what does exist)
# --------------------------------------------------------------------------------------------------
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")
_LISTED = 10


def _mlflow_call(client: Any, what: str, call: Any) -> Any:
    """``call()``; a not-found MLflow error becomes None, any other one a :class:`RegistryError`."""
    from mlflow.exceptions import MlflowException

    try:
        return call()
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return None
        raise RegistryError(
            f"MLflow at {client.tracking_uri} failed on {what}: {exc.message}; check that the server is up"
        ) from exc


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED]) + (f" (+{len(items) - _LISTED} more)" if len(items) > _LISTED else "")
    return shown or "none"


def registered_model(client: Any, name: str) -> Any:
    """The registered model ``name``, or :class:`ModelNotFoundError` listing the registered names."""
    found = _mlflow_call(client, f"model {name!r}", lambda: client.get_registered_model(name))
    if found is None:
        names = [
            m.name for m in _mlflow_call(client, "the model list", client.search_registered_models) or []
        ]
        raise ModelNotFoundError(
            f"no registered model {name!r} in MLflow at {client.tracking_uri} (registered: {_listing(names)}); "
            "check the name or register a model first (register-model flow or `skf demo`)"
        )
    return found


def model_version(client: Any, name: str, version: str | int) -> Any:
    """Version ``version`` of ``name``, or :class:`ModelNotFoundError` listing its versions."""
    version = str(version)
    if not version.isdigit():
        raise ModelNotFoundError(
            f"model version {version!r} of {name!r} is not a number; use models:/{name}/<n> or models:/{name}@<alias>"
        )
    registered_model(client, name)
    found = _mlflow_call(client, f"{name}/{version}", lambda: client.get_model_version(name, version))
    if found is None:
        escaped = name.replace("'", "\\'")
        listed = _mlflow_call(client, "versions", lambda: client.search_model_versions(f"name='{escaped}'"))
        versions = sorted((int(v.version) for v in listed or []), reverse=True)
        raise ModelNotFoundError(
            f"registered model {name!r} has no version {version} (versions: {_listing([str(v) for v in versions])}); "
            f"use one of those, or models:/{name}@{CHALLENGER}"
        )
    return found


def alias_version(client: Any, name: str, alias: str) -> Any:
    """The version behind ``name@alias``, or :class:`ModelNotFoundError` listing the aliases it has."""
    model = registered_model(client, name)
    found = _mlflow_call(client, f"{name}@{alias}", lambda: client.get_model_version_by_alias(name, alias))
    if found is None:
        aliases = [f"{a} -> version {v}" for a, v in sorted((getattr(model, "aliases", None) or {}).items())]
        fix = f"promote a version with `skf promote {name} VERSION`" if alias == CHAMPION else "set the alias"
        raise ModelNotFoundError(
            f"registered model {name!r} has no alias {alias!r} (aliases: {_listing(aliases)}); "
            f"{fix} or use models:/{name}/<version>"
        )
    return found


def resolve_model_uri(client: Any, uri: str) -> Any | None:
    """The model version behind ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.

    Other URIs (``runs:/``, ``models:/<model_id>``, local paths) return None: they name no version.
    """
    match = _MODEL_URI.match(uri)
    if match is None:
        return None
    if match["alias"] is not None:
        return alias_version(client, match["name"], match["alias"])
    return model_version(client, match["name"], match["version"])


def check_model_uri(client: Any, uri: str) -> Any | None:
    """Fail early, with a listing, when ``uri`` names a missing run, model, alias or version.

    Returns the model version for ``models:/<name>@<alias>`` and ``models:/<name>/<version>``, else None.
    """
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/") :].split("/", 1)[0]
        if _mlflow_call(client, f"run {run_id}", lambda: client.get_run(run_id)) is None:
            raise ModelNotFoundError(
                f"no MLflow run {run_id!r} in MLflow at {client.tracking_uri} ({uri}); check the run id "
                "(`mlflow ui` lists the runs)"
            )
        return None
    return resolve_model_uri(client, uri)


def metric_value(metrics: Mapping[str, float], name: str) -> float | None:
    """``metrics[name]``, or the one ``<split>/<name>`` entry (``test/psnr`` for ``psnr``)."""
    if name in metrics:
        return float(metrics[name])
    hits = [k for k in metrics if k.rsplit("/", 1)[-1] == name]
    if len(hits) > 1:
        raise RegistryError(f"metric {name!r} is ambiguous: {sorted(hits)}; name it fully in the policy")
    return float(metrics[hits[0]]) if hits else None


def _gain(challenger: float, champion: float, higher_is_better: bool) -> float:
    return challenger - champion if higher_is_better else champion - challenger


def decide(
    challenger: Candidate, champion: Candidate | None, policy: PromotionPolicy
) -> tuple[bool, str, list[str]]:
    """The promotion rules as a pure function: (promote?, reason, checks performed)."""
    checks: list[str] = []
    if not challenger.skb_pretrained:
        return False, "the SKB is not pretrained (random weights): such models are never promoted", checks
    checks.append("SKB pretrained (or no SKB)")
    if champion is None:
        return True, "no champion yet: the first pretrained challenger becomes champion", checks
    if champion.version == challenger.version:
        return False, f"version {challenger.version} is already the champion", checks
    for field in ("dataset_version", "protocol"):
        mine, theirs = getattr(challenger, field), getattr(champion, field)
        if mine != theirs:
            label = field.replace("_", " ")
            return (
                False,
                f"{label} differs from the champion's ({mine!r} vs {theirs!r}): not comparable",
                checks,
            )
    checks.append(f"same dataset version {challenger.dataset_version!r} and protocol {challenger.protocol!r}")

    new, old = (
        metric_value(challenger.metrics, policy.primary),
        metric_value(champion.metrics, policy.primary),
    )
    if new is None or old is None:
        who = "challenger" if new is None else f"champion (version {champion.version})"
        return False, f"the {who} has no {policy.primary!r} metric to compare", checks
    gain = _gain(new, old, policy.higher_is_better)
    if not gain > policy.margin:
        return (
            False,
            f"{policy.primary} {new:.4f} vs champion {old:.4f}: gain {gain:+.4f} does not exceed the margin "
            f"{policy.margin:g}",
            checks,
        )
    checks.append(f"{policy.primary} {new:.4f} vs {old:.4f}: gain {gain:+.4f} > margin {policy.margin:g}")

    for guard in policy.guards:
        g_new, g_old = (
            metric_value(challenger.metrics, guard.metric),
            metric_value(champion.metrics, guard.metric),
        )
        if g_old is None:
            checks.append(f"guard {guard.metric}: skipped (the champion has none)")
            continue
        if g_new is None:
            return False, f"guard metric {guard.metric!r} is missing for the challenger", checks
        change = _gain(g_new, g_old, guard.higher_is_better)
        if change < -guard.tolerance:
            return (
                False,
                f"guard {guard.metric} regressed: {g_new:.4f} vs champion {g_old:.4f} "
                f"(worse by {-change:.4f} > tolerance {guard.tolerance:g})",
                checks,
            )
        checks.append(
            f"guard {guard.metric}: {g_new:.4f} vs {g_old:.4f} within tolerance {guard.tolerance:g}"
        )
    return True, f"{policy.primary} improved by {gain:+.4f} over version {champion.version}", checks


# --------------------------------------------------------------------------------------------------
# Locking
# --------------------------------------------------------------------------------------------------
def _lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock id for a registered-model name."""
    return int.from_bytes(hashlib.sha256(f"skf-registry:{name}".encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def registry_lock(name: str, *, lock_url: str | None = None, timeout: float = 300.0) -> Iterator[None]:
    """Exclusive lock over the aliases of registered model ``name``.

    ``lock_url`` (default: the catalog URL): a PostgreSQL URL takes ``pg_advisory_lock`` on a
    dedicated connection (released when the block ends or the connection dies); anything else locks
    ``$SKF_HOME/locks/registry-<name>.lock`` with an OS file lock.
    """
    from components.settings import get_settings

    settings = get_settings()
    url = lock_url or settings.catalog_url
    if url.startswith(("postgresql", "postgres")):
        import sqlalchemy as sa

        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SET lock_timeout = :t"), {"t": f"{int(timeout * 1000)}ms"})
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _lock_key(name)})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _lock_key(name)})
                    conn.commit()
        finally:
            engine.dispose()
        return
    from filelock import FileLock

    directory = settings.home / "locks"
    directory.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    with FileLock(str(directory / f"registry-{safe}.lock"), timeout=timeout):
        yield


# --------------------------------------------------------------------------------------------------
# Logging and registering
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RegisteredEnhancer:
    name: str
    version: str
    model_uri: str
    run_id: str
    challenger: bool

    @property
    def version_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def default_model_name(dataset_version: str) -> str:
    """``skf-<dataset>`` from a dataset version ref such as ``lol-v2@3``."""
    dataset = dataset_version.split("@", 1)[0]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset).strip("-").lower()
    if not slug:
        raise ValueError(f"cannot derive a model name from dataset version {dataset_version!r}; pass name=")
    return f"skf-{slug}"


def pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc (installed versions; local tags such as ``+cu130`` dropped)."""
    return [f"{p}=={metadata.version(p).split('+', 1)[0]}" for p in _PIP_PACKAGES]


def model_signature() -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    image = TensorSpec(np.dtype(np.float32), (-1, -1, -1, 3))
    return ModelSignature(inputs=Schema([image]), outputs=Schema([image]))


def input_example() -> Any:
    """A mid-grey 64x64 batch of one: stored with the model to show what a request looks like, and
    predicted once by MLflow while logging, which checks that the logged model serves."""
    import numpy as np

    return np.full((1, 64, 64, 3), 0.5, dtype=np.float32)


def _what(spec: EnhancerSpec) -> str:
    if not spec.skf:
        return f"plain baseline {spec.baseline} (no SKB)"
    weights = "pretrained" if spec.skb_pretrained else "randomly initialised, never promoted"
    return f"baseline {spec.baseline} with SKB {spec.skb} ({weights}, fingerprint {spec.skb_fingerprint})"


def descriptions(
    spec: EnhancerSpec, *, version: str, dataset_version: str, protocol: str, metrics: Mapping[str, float]
) -> tuple[str, str]:
    """(registered model, model version) descriptions: what the registry UI shows a reader first."""
    scores = ", ".join(f"{k}={float(v):.4f}" for k, v in sorted(metrics.items())) or "none"
    model = (
        "SKF low-light enhancer (MLflow pyfunc: float32 (N, H, W, 3) RGB in [0, 1] -> the same). "
        f"Newest version {version}: {_what(spec)}."
    )
    mv = (
        f"{_what(spec)}{', two-pass' if spec.two_pass else ''}. Dataset version {dataset_version}; "
        f"evaluation protocol {protocol}; metrics: {scores}."
    )
    return model, mv


def _version_tags(
    spec: EnhancerSpec,
    *,
    run_id: str,
    dataset_version: str,
    protocol: str,
    metrics: Mapping[str, float],
    extra: Mapping[str, Any] | None,
) -> dict[str, str]:
    tags = {f"{TAG}{k}": v for k, v in spec.describe().items()}
    tags.update(
        {
            f"{TAG}dataset_version": dataset_version,
            f"{TAG}protocol": protocol,
            f"{TAG}run_id": run_id,
            f"{TAG}promotable": str(spec.skb_pretrained or not spec.skf).lower(),
        }
    )
    tags.update({f"{TAG}metric.{k}": repr(float(v)) for k, v in metrics.items()})
    tags.update({f"{TAG}{k}": str(v) for k, v in (extra or {}).items()})
    return tags


def _bundle_code(tmp: Path) -> list[str]:
    """Copies of the project packages the pyfunc imports, without caches."""
    paths = []
    for pkg in _CODE_PACKAGES:
        dst = tmp / "code" / pkg
        shutil.copytree(_PROJECT_ROOT / pkg, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        paths.append(str(dst))
    return paths


def log_enhancer(
    enhancer: Enhancer,
    spec: EnhancerSpec | None = None,
    *,
    run_id: str,
    dataset_version: str,
    protocol: str,
    metrics: Mapping[str, float],
    name: str | None = None,
    register: bool = True,
    set_challenger: bool = True,
    bundle_code: bool = True,
    extra_tags: Mapping[str, Any] | None = None,
    lock_url: str | None = None,
) -> RegisteredEnhancer:
    """Log ``enhancer`` as a pyfunc in run ``run_id``, register it under ``name`` and tag it.

    Uses MLflow's current tracking URI. ``metrics``: evaluation aggregates (``psnr`` or ``test/psnr``
    style keys); ``protocol``: the evaluation protocol name; both are what promotion compares.
    ``name`` defaults to :func:`default_model_name`. The new version becomes ``challenger`` unless a
    newer version already holds the alias (checked under :func:`registry_lock`).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import Model

    spec = spec or enhancer.spec
    if spec != enhancer.spec:
        raise ValueError("spec does not describe this enhancer (pass enhancer.spec or leave it out)")
    name = name or default_model_name(dataset_version)
    client = MlflowClient()
    # Model.log creates the logged model in the *active* experiment; it must be the run's own, or the
    # file store cannot read the model back when it is registered.
    mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
    with tempfile.TemporaryDirectory(prefix="skf-log-") as tmp_dir:
        tmp = Path(tmp_dir)
        files = save_enhancer(enhancer, tmp / "weights")
        card = {
            "enhancer": spec.to_dict(),
            "dataset_version": dataset_version,
            "protocol": protocol,
            "metrics": {k: float(v) for k, v in metrics.items()},
            "run_id": run_id,
            "io": "float32 (N, H, W, 3) RGB in [0, 1] -> float32 (N, H, W, 3)",
        }
        (tmp / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
        artifacts = {ARTIFACT_SPEC: str(files["spec"]), ARTIFACT_NET: str(files["enhancer"])}
        if "skb" in files:
            artifacts[ARTIFACT_SKB] = str(files["skb"])
        artifacts[ARTIFACT_CARD] = str(tmp / "model_card.json")
        info = Model.log(
            artifact_path=None,
            name=MODEL_ARTIFACT_NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts=artifacts,
            code_paths=_bundle_code(tmp) if bundle_code else None,
            signature=model_signature(),
            input_example=input_example(),  # MLflow also runs the logged model on it once (~1 s)
            pip_requirements=pip_requirements(),
        )
    run_tags = {f"{TAG}model_uri": info.model_uri, f"{TAG}dataset_version": dataset_version}
    if not register:
        _set_run_tags(client, run_id, run_tags)
        return RegisteredEnhancer(name, "", info.model_uri, run_id, challenger=False)

    tags = _version_tags(
        spec,
        run_id=run_id,
        dataset_version=dataset_version,
        protocol=protocol,
        metrics=metrics,
        extra=extra_tags,
    )
    mv = mlflow.register_model(info.model_uri, name, tags=tags)
    model_text, version_text = descriptions(
        spec, version=str(mv.version), dataset_version=dataset_version, protocol=protocol, metrics=metrics
    )
    client.update_registered_model(name, description=model_text)
    client.update_model_version(name, mv.version, description=version_text)
    challenger = False
    if set_challenger:
        with registry_lock(name, lock_url=lock_url):
            current = _alias_version(client, name, CHALLENGER)
            if current is None or int(current) < int(mv.version):
                client.set_registered_model_alias(name, CHALLENGER, mv.version)
                challenger = True
    run_tags.update({f"{TAG}registered_model": name, f"{TAG}registered_version": str(mv.version)})
    _set_run_tags(client, run_id, run_tags)
    if not (spec.skb_pretrained or not spec.skf):
        log.warning(
            "%s version %s has a randomly initialised SKB: registered, but it will never be promoted",
            name,
            mv.version,
        )
    return RegisteredEnhancer(name, str(mv.version), info.model_uri, run_id, challenger)


def log_enhancer_package(enhancer: Enhancer, run_id: str, artifact_path: str = PACKAGE_PATH) -> str:
    """Store the enhancer's spec + weights as plain run artifacts (what training hands to registration).

    Returns the ``runs:/`` URI that :func:`load_enhancer_package` and the ``register-model`` flow read.
    """
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="skf-pkg-") as tmp:
        save_enhancer(enhancer, tmp)
        MlflowClient().log_artifacts(run_id, tmp, artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


def load_enhancer_package(uri: str, *, device: str = "cpu") -> Enhancer:
    """Inverse of :func:`log_enhancer_package` (any artifact URI of such a folder).

    The download lives in a temporary folder that is removed once the weights are in memory.
    """
    from components.serving import downloaded, load_checked

    with downloaded(uri) as local:
        return load_checked(uri, lambda: load_enhancer_dir(local, device=device))


def _set_run_tags(client: Any, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)[:_MAX_TAG]) for k, v in tags.items()])


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def candidate(client: Any, name: str, version: str) -> Candidate:
    """The promotion facts of ``name`` ``version``, from its tags."""
    tags = model_version(client, name, version).tags
    metrics = {k[len(f"{TAG}metric.") :]: float(v) for k, v in tags.items() if k.startswith(f"{TAG}metric.")}
    return Candidate(
        version=str(version),
        dataset_version=tags.get(f"{TAG}dataset_version"),
        protocol=tags.get(f"{TAG}protocol"),
        skb_pretrained=tags.get(f"{TAG}promotable") == "true",
        metrics=metrics,
    )


# --------------------------------------------------------------------------------------------------
# Promotion
# --------------------------------------------------------------------------------------------------
def promote(
    name: str,
    version: str | int,
    policy: PromotionPolicy | None = None,
    *,
    lock_url: str | None = None,
) -> PromotionDecision:
    """Compare ``version`` with the current champion and move ``champion`` if the policy allows.

    Runs under :func:`registry_lock`; the champion is read after the lock is taken, and the alias is
    read back after it is set, so a concurrent writer that bypassed the lock is detected
    (:class:`RegistryError`) instead of silently lost. Returns the decision, also written as tags.
    """
    from mlflow import MlflowClient

    policy = policy or PromotionPolicy()
    client = MlflowClient()
    version = str(version)
    with registry_lock(name, lock_url=lock_url):
        mine = candidate(client, name, version)
        before = _alias_version(client, name, CHAMPION)
        champion = candidate(client, name, before) if before is not None else None
        promoted, reason, checks = decide(mine, champion, policy)
        after = before
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version)
            after = _alias_version(client, name, CHAMPION)
            if after != version:
                raise RegistryError(
                    f"{name}@{CHAMPION} is {after} right after setting it to {version}: another writer "
                    "moved it without the registry lock"
                )
            if before is not None:
                client.set_model_version_tag(name, before, f"{TAG}promotion.superseded_by", version)
        decision = PromotionDecision(
            name=name,
            version=version,
            promoted=promoted,
            reason=reason,
            champion_before=before,
            champion_after=after,
            checks=tuple(checks),
            policy=policy.to_dict(),
            decided_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        for key, value in decision.tags().items():
            client.set_model_version_tag(name, version, key, value)
        run_id = client.get_model_version(name, version).run_id
        if run_id:
            _set_run_tags(client, run_id, decision.tags())
    log.info("promotion of %s/%s: %s (%s)", name, version, "promoted" if promoted else "rejected", reason)
    return decision
