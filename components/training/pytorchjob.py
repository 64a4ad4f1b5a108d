"""Several machines: a training with ``nodes: M`` runs as a Kubeflow Training Operator ``PyTorchJob``.

:func:`launch_pytorchjob` is what :func:`~components.training.job.run_training` does for ``plan.nodes > 1``.
It fills the manifest of ``infra/k8s/pytorchjob.yaml`` (one Master and ``M - 1`` Worker pods, each running
``torchrun`` with ``plan.gpus`` processes of :mod:`components.training.launch`), submits it through the
Kubernetes API, waits for the operator to report it finished, and returns rank 0's outcome, which rank 0
writes to ``launches/<job name>/outcome.json`` of ``SKF_STORAGE_URI``. The operator, not this code, starts
the pods, wires the rendezvous (``PET_*`` variables read by torchrun) and stops the job when a pod fails.

Every pod is a fresh host: it reads the dataset, priors and checkpoints from the shared services
(catalog, ``SKF_STORAGE_URI``, MLflow) like any other worker, so a rerun resumes from the checkpoints that
rank 0 copied to the store. Settings, from the environment of the process that submits:

- ``SKF_PYTORCHJOB_TEMPLATE``: the manifest to fill (default ``infra/k8s/pytorchjob.yaml`` of the project);
- ``SKF_K8S_NAMESPACE``: where the job runs (default: this pod's namespace, else ``skf``);
- ``SKF_WORKER_IMAGE``: the image of the training pods (default: the template's);
- ``SKF_PYTORCHJOB_TIMEOUT_S``: how long to wait for the job (default 7 days; 0 waits forever);
- ``SKF_PYTORCHJOB_POLL_S``: seconds between two looks at the job's status (default 5);
- ``SKF_K8S_API_GRACE_S``: how long the API may stay unreachable or answer 429/5xx while the job runs before
  the wait gives up (default 600; a control-plane upgrade or an API-server restart is not a failed run).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from components.errors import SKFError, UserInputError

__all__ = [
    "GROUP",
    "KubeLaunchSettings",
    "PyTorchJobError",
    "job_name",
    "launch_pytorchjob",
    "load_template",
    "render",
]

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER = "pytorch"  # the container the operator configures (its name is fixed by the operator)
REQUEST_ENV = "SKF_TRAINING_REQUEST"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = PROJECT_ROOT / "infra" / "k8s" / "pytorchjob.yaml"
_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class PyTorchJobError(SKFError, RuntimeError):
    """The PyTorchJob could not be submitted, or it failed; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class KubeLaunchSettings:
    """Where and how the PyTorchJob is submitted (see the module docstring for the variables)."""

    template: Path = DEFAULT_TEMPLATE
    namespace: str = "skf"
    image: str | None = None
    timeout_s: float = 7 * 24 * 3600.0
    poll_s: float = 5.0
    api_grace_s: float = 600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KubeLaunchSettings:
        env = os.environ if env is None else env
        namespace = env.get("SKF_K8S_NAMESPACE") or (
            _SERVICE_ACCOUNT_NAMESPACE.read_text().strip() if _SERVICE_ACCOUNT_NAMESPACE.is_file() else "skf"
        )
        timeout = _seconds(env, "SKF_PYTORCHJOB_TIMEOUT_S", cls.timeout_s)
        poll = _seconds(env, "SKF_PYTORCHJOB_POLL_S", cls.poll_s)
        grace = _seconds(env, "SKF_K8S_API_GRACE_S", cls.api_grace_s)
        return cls(
            template=Path(env.get("SKF_PYTORCHJOB_TEMPLATE") or DEFAULT_TEMPLATE),
            namespace=namespace,
            image=env.get("SKF_WORKER_IMAGE") or None,
            timeout_s=timeout,
            poll_s=max(poll, 0.05),
            api_grace_s=grace,
        )


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    try:
        value = float(raw) if raw.strip() else default
    except ValueError:
        value = -1.0
    if value < 0:
        raise UserInputError(f"{name}={raw!r} is not a number of seconds >= 0; set it to e.g. {default:g}")
    return value


# --------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------
def load_template(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The PyTorchJob manifest at ``path``, checked for what :func:`render` fills in."""
    path = Path(path)
    try:
        manifest = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserInputError(
            f"cannot read the PyTorchJob template {path}: {exc}; set SKF_PYTORCHJOB_TEMPLATE to a valid file"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise UserInputError(f"{path} is not a {KIND} manifest; start from infra/k8s/pytorchjob.yaml")
    replicas = manifest.get("spec", {}).get("pytorchReplicaSpecs", {})
    for role in ("Master", "Worker"):
        containers = replicas.get(role, {}).get("template", {}).get("spec", {}).get("containers", [])
        if not any(c.get("name") == CONTAINER for c in containers):
            raise UserInputError(
                f"{path}: pytorchReplicaSpecs.{role} needs a container named {CONTAINER!r} (the operator "
                "configures that one); start from infra/k8s/pytorchjob.yaml"
            )
    return manifest


def job_name(recipe: str) -> str:
    """A fresh DNS-1035 name: ``skf-<recipe>-<6 hex>``, short enough for the operator's pod names."""
    stem = re.sub(r"[^a-z0-9]+", "-", recipe.lower()).strip("-")[:30].strip("-") or "train"
    return f"skf-{stem}-{secrets.token_hex(3)}"


def launch_args(version_ref: str, outcome_key: str, stop_after_step: int | None) -> list[str]:
    """torchrun's arguments after the ones it takes from the operator's ``PET_*`` variables."""
    args = [
        "-m", "components.training.launch",
        "--version", version_ref,
        "--request-env", REQUEST_ENV,
        "--outcome-key", outcome_key,
    ]  # fmt: skip
    if stop_after_step is not None:
        args += ["--stop-after-step", str(stop_after_step)]
    return args


def render(
    template: Mapping[str, Any],
    *,
    name: str,
    namespace: str,
    nodes: int,
    gpus: int,
    args: list[str],
    env: Mapping[str, str],
    image: str | None = None,
) -> dict[str, Any]:
    """The manifest of one job: ``template`` with the run's name, sizes, command and variables."""
    if nodes < 2:
        raise UserInputError(
            f"a PyTorchJob is for 2 or more nodes, got nodes={nodes}; use training.gpus alone"
        )
    manifest = copy.deepcopy(dict(template))
    manifest["metadata"] = {**manifest.get("metadata", {}), "name": name, "namespace": namespace}
    spec = manifest["spec"]
    spec["nprocPerNode"] = str(gpus)
    replicas = spec["pytorchReplicaSpecs"]
    for role, count in (("Master", 1), ("Worker", nodes - 1)):
        replicas[role] = copy.deepcopy(replicas[role])  # YAML anchors share one template: make two
        replicas[role]["replicas"] = count
        pod = replicas[role]["template"]
        labels = pod.setdefault("metadata", {}).setdefault("labels", {})
        labels["skf.training/job"] = name
        for container in pod["spec"]["containers"]:
            if container.get("name") != CONTAINER:
                continue
            container["args"] = list(args)
            if image:
                container["image"] = image
            kept = [e for e in container.get("env", []) if e.get("name") not in env]
            container["env"] = kept + [{"name": k, "value": v} for k, v in env.items()]
            limits = container.setdefault("resources", {}).setdefault("limits", {})
            if "nvidia.com/gpu" in limits:
                limits["nvidia.com/gpu"] = gpus
    return manifest


# --------------------------------------------------------------------------------------------------
# Submitting and waiting
# --------------------------------------------------------------------------------------------------
def _kube_api() -> tuple[Any, Any]:
    """(CustomObjectsApi, CoreV1Api) from the pod's service account, else from KUBECONFIG."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            # KUBECONFIG read now: the library fixed its default path when it was first imported
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        except (config.ConfigException, OSError) as exc:
            raise PyTorchJobError(
                "training.nodes > 1 submits a Kubernetes PyTorchJob, but no cluster is configured: run the "
                f"flow in the cluster (Kubernetes work pool) or set KUBECONFIG ({exc})"
            ) from exc
    return client.CustomObjectsApi(), client.CoreV1Api()


def _api_error(exc: Exception, namespace: str) -> PyTorchJobError:
    status = getattr(exc, "status", None)
    hint = {
        404: f"is the Kubeflow Training Operator installed and namespace {namespace!r} there? "
        "(infra/k8s/README.md, multi-node training)",
        403: f"the service account may not manage pytorchjobs in {namespace!r}; apply "
        "infra/k8s/pytorchjob-rbac.yaml",
        422: "the cluster rejected the manifest; check SKF_PYTORCHJOB_TEMPLATE against infra/k8s/pytorchjob.yaml",
    }.get(status, "check the cluster and SKF_K8S_NAMESPACE")
    return PyTorchJobError(f"Kubernetes API error on the PyTorchJob: {_reason(exc)}; {hint}")


#: API answers worth waiting out: rate limiting and server-side failures (an API server restarting).
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


def _transient(exc: Exception) -> bool:
    """A refused or dropped connection, or a :data:`TRANSIENT_STATUS` answer."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(exc, ApiException):
        return exc.status in TRANSIENT_STATUS
    return isinstance(exc, HTTPError | ConnectionError | TimeoutError)


def _reason(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    text = getattr(exc, "reason", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"{status} {text}" if status else f"{type(exc).__name__}: {text}"


def _wait_error(exc: Exception, name: str, namespace: str) -> PyTorchJobError:
    if getattr(exc, "status", None) == 404:
        return PyTorchJobError(
            f"PyTorchJob {namespace}/{name} disappeared while it ran (deleted outside this run?); "
            "rerun the training: it resumes from the last checkpoint in the store"
        )
    return _api_error(exc, namespace)


def job_state(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(state, message) from a PyTorchJob's status: Succeeded/Failed when finished, else the newest true
    condition (Created, Running, Restarting, Suspended) or Pending."""
    conditions = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    for final in ("Failed", "Succeeded"):
        for c in conditions:
            if c.get("type") == final:
                return final, c.get("message", "")
    if conditions:
        return conditions[-1].get("type", "Pending"), conditions[-1].get("message", "")
    return "Pending", ""


def _master_log_tail(core: Any, name: str, namespace: str, lines: int = 30) -> list[str]:
    """The last ``lines`` of the Master pod's log, or nothing if it cannot be read."""
    try:
        text = core.read_namespaced_pod_log(f"{name}-master-0", namespace, tail_lines=lines)
    except Exception:  # the log is a courtesy: a missing pod or RBAC gap must not hide the job's result
        return []
    return str(text).splitlines()


def wait_for_job(
    api: Any, name: str, namespace: str, *, settings: KubeLaunchSettings, log: Callable[[str], None]
) -> tuple[str, str]:
    """Poll the job until the operator marks it Succeeded or Failed; (state, message).

    An unreachable API or a 429/5xx answer is retried for ``settings.api_grace_s`` (the job keeps running
    meanwhile); a job that disappears or any other API error ends the wait at once.
    """
    deadline = time.monotonic() + settings.timeout_s if settings.timeout_s > 0 else None
    last = None
    outage: float | None = None  # when the current run of transient failures began
    while True:
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as exc:
            if not _transient(exc):
                raise _wait_error(exc, name, namespace) from exc
            now = time.monotonic()
            if outage is None:
                outage = now
                log(
                    f"Kubernetes API unavailable ({_reason(exc)}); retrying for up to {settings.api_grace_s:g} s"
                )
            elif now - outage > settings.api_grace_s:
                raise PyTorchJobError(
                    f"the Kubernetes API stayed unavailable for over {settings.api_grace_s:g} s while PyTorchJob "
                    f"{namespace}/{name} ran ({_reason(exc)}); raise SKF_K8S_API_GRACE_S for longer outages"
                ) from exc
            time.sleep(settings.poll_s)
            continue
        if outage is not None:
            log(f"Kubernetes API reachable again after {time.monotonic() - outage:.0f} s")
            outage = None
        state, message = job_state(obj)
        if state != last:
            log(f"PyTorchJob {namespace}/{name}: {state}" + (f" ({message})" if message else ""))
            last = state
        if state in ("Succeeded", "Failed"):
            return state, message
        if deadline is not None and time.monotonic() > deadline:
            raise PyTorchJobError(
                f"PyTorchJob {namespace}/{name} did not finish within {settings.timeout_s:.0f} s; it was "
                "deleted. Raise SKF_PYTORCHJOB_TIMEOUT_S for longer trainings"
            )
        time.sleep(settings.poll_s)


def launch_pytorchjob(
    version_ref: str,
    plan: Any,
    *,
    stop_after_step: int | None = None,
    log: Callable[[str], None] = print,
    settings: KubeLaunchSettings | None = None,
) -> Any:
    """Train ``plan`` on ``plan.nodes`` pods of ``plan.gpus`` processes each; returns rank 0's TrainOutcome."""
    from kubernetes.client.exceptions import ApiException

    from components.data.ingest import get_version
    from components.settings import get_settings
    from components.storage import open_storage
    from components.training.launch import outcome_from

    get_version(version_ref)  # an unknown version fails here, not after the cluster has scheduled the pods
    settings = settings or KubeLaunchSettings.from_env()
    name = job_name(plan.recipe.name)
    outcome_key = f"launches/{name}/outcome.json"
    manifest = render(
        load_template(settings.template),
        name=name,
        namespace=settings.namespace,
        nodes=plan.nodes,
        gpus=plan.gpus,
        args=launch_args(version_ref, outcome_key, stop_after_step),
        env={REQUEST_ENV: plan.request.model_dump_json()},
        image=settings.image,
    )
    api, core = _kube_api()
    log(f"submitting PyTorchJob {settings.namespace}/{name}: {plan.nodes} nodes x {plan.gpus} processes")
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, settings.namespace, PLURAL, manifest)
    except ApiException as exc:
        raise _api_error(exc, settings.namespace) from exc
    try:
        state, message = wait_for_job(api, name, settings.namespace, settings=settings, log=log)
    except BaseException:  # interrupted, cancelled or timed out: do not leave GPU pods running
        _delete(api, name, settings.namespace, log)
        raise
    tail = _master_log_tail(core, name, settings.namespace)
    for line in tail:
        log(line)
    try:  # absent when rank 0 never got to write it (a pod that did not start, a crash)
        result = json.loads(open_storage(get_settings().storage_uri).get_bytes(outcome_key))
    except FileNotFoundError:
        result = None
    return outcome_from(
        result,
        failed=state != "Succeeded",
        what=f"PyTorchJob {settings.namespace}/{name} ended {state}" + (f": {message}" if message else ""),
        tail=tail,
    )


def _delete(api: Any, name: str, namespace: str, log: Callable[[str], None]) -> None:
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        log(f"deleted PyTorchJob {namespace}/{name}")
    except Exception as exc:  # already gone, or the API is unreachable: say so, keep the first error
        log(f"could not delete PyTorchJob {namespace}/{name}: {exc}")
