"""MLflow as its users expect: the experiment from ``MLFLOW_EXPERIMENT_NAME``, datasets logged as run inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.data.records import VersionSummary
from components.settings import Settings
from components.tracking import CONFIG_HASH_TAG, experiment_name, finished_run, mlflow_client
from components.training.mlflow_logger import MlflowLogger


def summary(source_uri: str, name: str = "lol-v2", version: int = 3) -> VersionSummary:
    return VersionSummary(
        name=name,
        version=version,
        id=1,
        manifest_sha256=hashlib.sha256(f"{name}@{version}".encode()).hexdigest(),
        layout="lol",
        source_uri=source_uri,
        image_count=4,
        created_at=None,
    )


@pytest.mark.parametrize(("env", "expected"), [({}, "skf"), ({"MLFLOW_EXPERIMENT_NAME": " "}, "skf")])
def test_experiment_name_defaults_to_skf(env: dict[str, str], expected: str) -> None:
    assert Settings.from_env(env).mlflow_experiment_name == expected


def test_two_experiment_names_put_runs_in_two_experiments(
    skf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_ids: dict[str, str] = {}
    for name in ("skf-team-a", "skf-team-b"):
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
        assert experiment_name() == name
        client = mlflow_client()
        with MlflowLogger(client.tracking_uri, tags={CONFIG_HASH_TAG: f"hash-{name}"}) as logger:
            run_ids[name] = logger.run_id
        assert finished_run(client, f"hash-{name}").info.run_id == logger.run_id

    client = MlflowClient()
    experiments = {
        name: client.get_experiment(client.get_run(run_id).info.experiment_id).name
        for name, run_id in run_ids.items()
    }
    assert experiments == {"skf-team-a": "skf-team-a", "skf-team-b": "skf-team-b"}
    # each experiment's look-up sees only its own runs
    assert finished_run(client, "hash-skf-team-a") is None  # MLFLOW_EXPERIMENT_NAME is skf-team-b now
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "skf-team-a")
    assert finished_run(client, "hash-skf-team-a").info.run_id == run_ids["skf-team-a"]


@pytest.mark.parametrize(
    ("source_uri", "source_type", "source_key"),
    [
        ("/data/LOL-v2", "local", "uri"),
        ("s3://bucket/datasets/lol-v2.zip", "s3", "uri"),
        ("https://example.org/lol-v2.zip", "http", "url"),
    ],
)
def test_training_run_logs_its_dataset_version_as_an_input(
    skf_home: Path, source_uri: str, source_type: str, source_key: str
) -> None:
    version = summary(source_uri)
    uri = mlflow_client().tracking_uri
    with MlflowLogger(uri, dataset=version) as logger:
        pass
    with MlflowLogger(uri, run_id=logger.run_id, dataset=version):  # a resumed run logs it again
        pass

    inputs = MlflowClient().get_run(logger.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset, tags = inputs[0].dataset, {t.key: t.value for t in inputs[0].tags}
    assert dataset.name == "lol-v2@3"
    assert dataset.digest == version.manifest_sha256[:36]
    assert dataset.source_type == source_type
    assert dataset.source == f'{{"{source_key}": "{source_uri}"}}'
    assert tags == {
        "mlflow.data.context": "training",
        "skf.dataset_version": "lol-v2@3",
        "skf.manifest_sha256": version.manifest_sha256,
    }
