"""``training.nodes: M`` trains on M machines as a Kubeflow PyTorchJob submitted by the train task.

The manifest (``infra/k8s/pytorchjob.yaml`` filled per run) is checked against the PyTorchJob schema and
the Kubernetes API's pod model. The submission path runs against :mod:`tests.fake_kube`, a loopback API
server that plays the operator with one local process per pod, each with its own ``SKF_HOME``: a two-node
training through the flow is stopped after its step-2 checkpoint and resubmitted, resumes on fresh "pods"
from the checkpoints in the store, logs each step once, and ends with the weights of a one-host run of the
same world size.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from components.errors import UserInputError
from components.training.pytorchjob import (
    DEFAULT_TEMPLATE,
    KubeLaunchSettings,
    PyTorchJobError,
    job_name,
    job_state,
    launch_args,
    launch_pytorchjob,
    load_template,
    render,
)
from tests.fake_kube import fake_cluster
from tests.k8s_schemas import PYTORCHJOB_SCHEMA, unknown_pod_fields
from tests.pipeline_fixtures import (
    assert_same_weights,
    latest_state,
    make_tiny_dataset,
    tiny_params,
    train_reference,
    use_home,
)

RBAC = DEFAULT_TEMPLATE.parent / "pytorchjob-rbac.yaml"
OVERRIDES = {"train": {"iterations": 4, "batch_size": 2, "crop": 32, "ckpt_every": 2, "val_every": 2}}


def _plan(source: Path, *, gpus: int = 1, nodes: int = 1) -> Any:
    from components.pipeline.params import SkfTrainParams

    training = {"overrides": OVERRIDES, "val_fraction": 0.0, "gpus": gpus, "nodes": nodes, "device": "cpu"}
    return SkfTrainParams.model_validate(tiny_params(source, training=training)).plan()


def _rendered(**kwargs: Any) -> dict[str, Any]:
    values = {
        "name": "skf-demo-abc123",
        "namespace": "skf",
        "nodes": 3,
        "gpus": 4,
        "args": launch_args("tiny@1", "launches/skf-demo-abc123/outcome.json", None),
        "env": {"SKF_TRAINING_REQUEST": '{"recipe": "demo"}'},
    }
    return render(load_template(DEFAULT_TEMPLATE), **(values | kwargs))


def _container(manifest: dict[str, Any], role: str) -> dict[str, Any]:
    (container,) = manifest["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"]
    return container


# ----------------------------------------------------------------------------- the manifest
def test_the_template_is_a_valid_pytorchjob() -> None:
    template = load_template(DEFAULT_TEMPLATE)
    jsonschema.validate(template, PYTORCHJOB_SCHEMA)
    for role in ("Master", "Worker"):
        pod = template["spec"]["pytorchReplicaSpecs"][role]["template"]
        assert unknown_pod_fields(pod) == []
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        container = pod["spec"]["containers"][0]
        assert {"name": "pytorchjob-port", "containerPort": 23456} in container["ports"]
        assert container["command"] == ["python", "-m", "torch.distributed.run"]
        assert container["workingDir"] == "/opt/skf"  # the image's project copy (Dockerfile.gpu-worker)
    # the checks bite: a misspelt pod field, a second Master, an unknown replica type
    broken = copy.deepcopy(template)
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
        "imagePullPolicyy"
    ] = "x"
    assert unknown_pod_fields(broken["spec"]["pytorchReplicaSpecs"]["Master"]["template"]) == [
        "template.spec.containers[0].imagePullPolicyy"
    ]
    for path, value in ((("Master", "replicas"), 2), (("Chief",), {"replicas": 1})):
        broken = copy.deepcopy(template)
        node = broken["spec"]["pytorchReplicaSpecs"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, PYTORCHJOB_SCHEMA)


def test_the_image_ships_the_template() -> None:
    dockerfile = (DEFAULT_TEMPLATE.parents[1] / "docker" / "Dockerfile.gpu-worker").read_text()
    assert "COPY infra/k8s/pytorchjob.yaml ./infra/k8s/pytorchjob.yaml" in dockerfile


def test_render_fills_in_the_run() -> None:
    manifest = _rendered(image="registry.example.com/skf-worker:0.2.0")
    jsonschema.validate(manifest, PYTORCHJOB_SCHEMA)
    assert manifest["metadata"]["name"] == "skf-demo-abc123" and manifest["metadata"]["namespace"] == "skf"
    assert manifest["spec"]["nprocPerNode"] == "4"
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    for role in ("Master", "Worker"):
        container = _container(manifest, role)
        assert container["image"] == "registry.example.com/skf-worker:0.2.0"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
        assert container["args"][:2] == ["-m", "components.training.launch"]
        assert container["args"][container["args"].index("--outcome-key") + 1] == (
            "launches/skf-demo-abc123/outcome.json"
        )
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env == {"OMP_NUM_THREADS": "4", "SKF_TRAINING_REQUEST": '{"recipe": "demo"}'}
        assert unknown_pod_fields(replicas[role]["template"]) == []
    # two independent pod templates (the file's YAML anchor shares one), the template left as it was
    assert _container(manifest, "Master") is not _container(manifest, "Worker")
    assert _container(load_template(DEFAULT_TEMPLATE), "Master")["args"] == []
    assert _container(_rendered(), "Master")["image"] == "skf-worker:0.1.0"  # no SKF_WORKER_IMAGE: the file's


def test_render_and_template_errors(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="2 or more nodes"):
        _rendered(nodes=1)
    not_a_job = tmp_path / "job.yaml"
    not_a_job.write_text("apiVersion: batch/v1\nkind: Job\n")
    with pytest.raises(UserInputError, match=f"{re.escape(str(not_a_job))} is not a PyTorchJob"):
        load_template(not_a_job)
    renamed = load_template(DEFAULT_TEMPLATE)
    renamed["spec"]["pytorchReplicaSpecs"]["Worker"]["template"] = copy.deepcopy(
        renamed["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    )
    renamed["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    bad = tmp_path / "renamed.yaml"
    bad.write_text(yaml.safe_dump(renamed))
    with pytest.raises(UserInputError, match="Worker needs a container named 'pytorch'"):
        load_template(bad)
    with pytest.raises(UserInputError, match="cannot read the PyTorchJob template"):
        load_template(tmp_path / "missing.yaml")


def test_job_names_are_fresh_dns_names() -> None:
    names = {job_name("LLFlow-L-SKF (LOL-v2 real)") for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert re.fullmatch(r"skf-llflow-l-skf-lol-v2-real-[0-9a-f]{6}", name), name
        assert len(name) + len("-worker-63") <= 63  # the operator's pod and service names
    assert re.fullmatch(r"skf-train-[0-9a-f]{6}", job_name("___"))


def test_job_state_reads_the_operator_conditions() -> None:
    assert job_state({}) == ("Pending", "")
    created = {"type": "Created", "status": "True", "message": "created"}
    assert job_state({"status": {"conditions": [created]}}) == ("Created", "created")
    running = [created, {"type": "Running", "status": "True"}]
    assert job_state({"status": {"conditions": running}})[0] == "Running"
    done = [created, {"type": "Running", "status": "False"}, {"type": "Succeeded", "status": "True"}]
    assert job_state({"status": {"conditions": done}})[0] == "Succeeded"
    failed = [*running, {"type": "Failed", "status": "True", "message": "pod x failed"}]
    assert job_state({"status": {"conditions": failed}}) == ("Failed", "pod x failed")


def test_launch_settings_from_the_environment(tmp_path: Path) -> None:
    settings = KubeLaunchSettings.from_env({
        "SKF_K8S_NAMESPACE": "ml", "SKF_WORKER_IMAGE": "r/skf:1", "SKF_PYTORCHJOB_TIMEOUT_S": "60",
        "SKF_PYTORCHJOB_TEMPLATE": str(tmp_path / "mine.yaml"), "SKF_PYTORCHJOB_POLL_S": "0.5",
    })  # fmt: skip
    assert settings == KubeLaunchSettings(tmp_path / "mine.yaml", "ml", "r/skf:1", 60.0, 0.5)
    assert KubeLaunchSettings.from_env({}).template == DEFAULT_TEMPLATE
    with pytest.raises(UserInputError, match="SKF_PYTORCHJOB_TIMEOUT_S='a day'"):
        KubeLaunchSettings.from_env({"SKF_PYTORCHJOB_TIMEOUT_S": "a day"})


def test_the_rbac_grants_what_the_launcher_calls() -> None:
    account, role, binding = yaml.safe_load_all(RBAC.read_text())
    assert account["kind"] == "ServiceAccount" and role["kind"] == "Role" and binding["kind"] == "RoleBinding"
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}  # fmt: skip
    assert {"create", "get", "delete"} <= rules[("kubeflow.org", "pytorchjobs")]
    assert "get" in rules[("", "pods/log")]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]  # fmt: skip


# ----------------------------------------------------------------------------- submitting
def _cluster_env(monkeypatch: pytest.MonkeyPatch, cluster: Any, tmp_path: Path, **extra: str) -> None:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.setenv("SKF_K8S_NAMESPACE", "skf")
    monkeypatch.setenv("SKF_PYTORCHJOB_POLL_S", "0.2")
    for key, value in extra.items():
        monkeypatch.setenv(key, value)


def _services() -> dict[str, str]:
    """The flow-run pod's services, as the cluster's ``skf-runtime`` Secret gives them to every pod."""
    from components.settings import get_settings

    settings = get_settings()
    return {
        "SKF_CATALOG_URL": settings.catalog_url,
        "SKF_STORAGE_URI": settings.storage_uri,
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
    }


def _ingested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, str]:
    """A two-node plan and the version it trains on, ingested into a fresh home."""
    from components.data.ingest import ingest

    use_home(monkeypatch, tmp_path / "home")
    source = make_tiny_dataset(tmp_path / "data")
    return _plan(source, nodes=2), ingest(str(source), name="tiny", layout="lol").ref


def test_no_cluster_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, ref = _ingested(tmp_path, monkeypatch)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(PyTorchJobError, match="no cluster is configured: run the flow in the cluster"):
        launch_pytorchjob(ref, plan, log=lambda _m: None)


def test_an_unknown_version_fails_before_anything_is_submitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.data.ingest import DatasetNotFoundError

    plan, _ref = _ingested(tmp_path, monkeypatch)
    with fake_cluster(tmp_path / "pods", {"skf-runtime": _services()}) as cluster:
        _cluster_env(monkeypatch, cluster, tmp_path)
        with pytest.raises(DatasetNotFoundError, match="never-ingested"):
            launch_pytorchjob("never-ingested@1", plan, log=lambda _m: None)
        assert cluster.submitted == []


def test_a_cluster_without_the_operator_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan, ref = _ingested(tmp_path, monkeypatch)
    with fake_cluster(tmp_path / "pods", {}, crd_installed=False) as cluster:
        _cluster_env(monkeypatch, cluster, tmp_path)
        with pytest.raises(PyTorchJobError, match="404.*Kubeflow Training Operator installed"):
            launch_pytorchjob(ref, plan, log=lambda _m: None)


def test_a_failed_pod_fails_the_run_with_rank_0s_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster's Secret points the pods at another (empty) catalog: rank 0 cannot find the version, its
    error reaches the submitter, and the job ends Failed."""
    from components.training.launch import DistributedTrainingError

    plan, ref = _ingested(tmp_path, monkeypatch)
    wrong = {**_services(), "SKF_CATALOG_URL": f"sqlite:///{tmp_path / 'other-catalog.db'}"}
    lines: list[str] = []
    with fake_cluster(tmp_path / "pods", {"skf-runtime": wrong}) as cluster:
        _cluster_env(monkeypatch, cluster, tmp_path)
        with pytest.raises(DistributedTrainingError, match="tiny"):
            launch_pytorchjob(ref, plan, log=lines.append)
        (job,) = cluster.jobs.values()
    assert job.state()[0] == "Failed"
    assert any("PyTorchJob skf/" in line and "Failed" in line for line in lines)


def test_a_missing_secret_and_a_timeout_end_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.training.launch import DistributedTrainingError

    plan, ref = _ingested(tmp_path, monkeypatch)
    with fake_cluster(tmp_path / "pods", {}) as cluster:
        _cluster_env(monkeypatch, cluster, tmp_path)
        with pytest.raises(DistributedTrainingError, match="secret 'skf-runtime' not found"):
            launch_pytorchjob(ref, plan, log=lambda _m: None)
    with fake_cluster(tmp_path / "pods-2", {"skf-runtime": _services()}) as cluster:
        _cluster_env(monkeypatch, cluster, tmp_path, SKF_PYTORCHJOB_TIMEOUT_S="1")
        with pytest.raises(PyTorchJobError, match="did not finish within 1 s; it was deleted"):
            launch_pytorchjob(ref, plan, log=lambda _m: None)
        (job,) = cluster.jobs.values()
        assert job.deleted and all(pod.process.wait(timeout=30) is not None for pod in job.pods)


def test_the_wait_rides_out_an_api_outage_and_gives_up_after_its_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """503s while the job runs (an API server restarting) are waited out and the job's own verdict is
    reported; an outage longer than SKF_K8S_API_GRACE_S ends the wait and deletes the job."""
    from components.training.launch import DistributedTrainingError

    plan, ref = _ingested(tmp_path, monkeypatch)
    lines: list[str] = []
    with fake_cluster(tmp_path / "pods", {}) as cluster:  # no Secret: the job fails once it is read
        _cluster_env(monkeypatch, cluster, tmp_path)
        cluster.unavailable_reads = 3
        with pytest.raises(DistributedTrainingError, match="secret 'skf-runtime' not found"):
            launch_pytorchjob(ref, plan, log=lines.append)
        assert cluster.reads >= 4 and cluster.unavailable_reads == 0
    assert any("Kubernetes API unavailable (503 Service Unavailable" in line for line in lines)
    assert any("Kubernetes API reachable again" in line for line in lines)
    with fake_cluster(tmp_path / "pods-2", {}) as cluster:
        _cluster_env(monkeypatch, cluster, tmp_path, SKF_K8S_API_GRACE_S="0.5")
        cluster.unavailable_reads = 10**6
        with pytest.raises(PyTorchJobError, match="stayed unavailable for over 0.5 s .*SKF_K8S_API_GRACE_S"):
            launch_pytorchjob(ref, plan, log=lambda _m: None)
        (job,) = cluster.jobs.values()
        assert job.deleted


@pytest.mark.parametrize(
    ("status", "match"),
    [(404, "disappeared while it ran .* resumes"), (403, "may not manage pytorchjobs in 'skf'")],
)
def test_a_vanished_job_or_a_refused_read_ends_the_wait_at_once(status: int, match: str) -> None:
    from kubernetes.client.exceptions import ApiException

    from components.training.pytorchjob import KubeLaunchSettings, wait_for_job

    class Api:
        calls = 0

        def get_namespaced_custom_object(self, *args: Any) -> dict[str, Any]:
            Api.calls += 1
            raise ApiException(status=status, reason="Refused")

    with pytest.raises(PyTorchJobError, match=match):
        wait_for_job(Api(), "job-1", "skf", settings=KubeLaunchSettings(poll_s=0.01), log=lambda _m: None)
    assert Api.calls == 1  # no retry


@pytest.mark.slow
def test_two_node_training_from_the_flow_stops_resumes_and_matches(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from components.data.ingest import ingest
    from components.training.job import TrainingInterrupted
    from flows.train import train_model

    source = make_tiny_dataset(tmp_path / "data")
    plan = _plan(source, nodes=2)

    # the reference: one host, two processes (same world size), on its own services
    reference = train_reference(monkeypatch, tmp_path / "reference", source, _plan(source, gpus=2))
    assert reference.steps == 4

    home = use_home(monkeypatch, tmp_path / "submitter")
    ref = ingest(str(source), name="tiny", layout="lol").ref
    # the cluster's own template: one thread per pod like the reference's processes (float sums in
    # another thread count differ in the last bits)
    template = DEFAULT_TEMPLATE.read_text().replace('value: "4"', 'value: "1"')
    assert template != DEFAULT_TEMPLATE.read_text()
    (tmp_path / "pytorchjob.yaml").write_text(template)
    with fake_cluster(tmp_path / "pods", {"skf-runtime": _services()}) as cluster:
        _cluster_env(
            monkeypatch, cluster, tmp_path, SKF_PYTORCHJOB_TEMPLATE=str(tmp_path / "pytorchjob.yaml")
        )
        with pytest.raises(TrainingInterrupted, match="stopped after step 2"):
            train_model(ref, plan, stop_after_step=2)
        resumed = train_model(ref, plan)
        first, second = cluster.submitted
    assert resumed["status"] == "resumed" and resumed["steps"] == 4
    assert resumed["config_hash"] == reference.config_hash  # 2 nodes x 1 process trains what 1 x 2 does

    for manifest in (first, second):
        jsonschema.validate(manifest, PYTORCHJOB_SCHEMA)
        assert manifest["spec"]["nprocPerNode"] == "1"
        assert manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
        request = {e["name"]: e["value"] for e in _container(manifest, "Worker")["env"]}[
            "SKF_TRAINING_REQUEST"
        ]
        assert json.loads(request)["nodes"] == 2
    # the second job's pods are new machines: the worker pod fetched the step-2 checkpoint from the store
    second_name = second["metadata"]["name"]
    worker_run = cluster.pod_home(second_name, "Worker", 0) / "runs" / reference.config_hash[:16]
    assert sorted(p.name for p in (worker_run / "checkpoints").glob("step-*.pt"))[:1] == ["step-00000002.pt"]
    assert not (home / "runs").exists()  # the submitting host trained nothing itself

    # one MLflow run, logged by rank 0 only: each step once
    client = MlflowClient((home / "mlruns").as_uri())
    assert client.get_run(resumed["run_id"]).data.tags["world_size"] == "2"
    (experiment,) = [e for e in client.search_experiments() if e.name == "skf"]
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert sorted(m.step for m in client.get_metric_history(resumed["run_id"], "train/loss")) == [1, 2, 3, 4]

    got = latest_state(cluster.pod_home(second_name, "Master", 0), reference.config_hash)
    assert got["step"] == 4 and got["world_size"] == 2
    assert_same_weights(got, latest_state(tmp_path / "reference", reference.config_hash))
