"""The skf-train / skf-retrain flows: validation before work, skipping on rerun, resume, nightly retrain."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.pipeline_fixtures import WorkCounter, install_work_spies, make_tiny_dataset, tiny_params

REPO = Path(__file__).resolve().parents[1]
TINY_CLI_OVERRIDES = {
    "model.nf": 16,
    "model.light_blocks": 1,
    "model.n_layers": 1,
    "model.heads": 2,
    "model.d_inner": 64,
    "train.iterations": 4,
    "train.batch_size": 2,
    "train.crop": 32,
    "train.ckpt_every": 2,
    "train.val_every": 2,
    "scheduler.name": "constant",
    "scheduler.milestones": "null",
}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny-demo") / "data")


@pytest.fixture()
def tiny_copy(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A private, writable copy (for tests that add images)."""
    import shutil

    dest = tmp_path / "data"
    shutil.copytree(tiny_dataset, dest)
    return dest


@pytest.fixture()
def work(monkeypatch: pytest.MonkeyPatch) -> WorkCounter:
    return install_work_spies(monkeypatch)


def _datasets() -> list[str]:
    import sqlalchemy as sa

    from components.catalog import Dataset, open_catalog

    with open_catalog().session() as session:
        return list(session.scalars(sa.select(Dataset.name)))


# --------------------------------------------------------------------------------------------------
# Planning and parameter validation (no Prefect)
# --------------------------------------------------------------------------------------------------
def test_plan_defaults_to_the_skf_recipe_and_skb_off_to_the_plain_one() -> None:
    from components.training.plan import plan

    skf = plan(baseline="baseline/snr-net", skb="skb/hrnet-w48-lite@1")
    assert (skf.recipe.name, skf.baseline, skf.skb) == (
        "snr-net-skf",
        "baseline/snr-net@1",
        "skb/hrnet-w48-lite@1",
    )
    assert skf.recipe.skf.se and skf.recipe.skf.sch.enabled
    plain = plan(baseline="baseline/snr-net@1", skb="off")
    assert plain.recipe.name == "snr-net" and plain.skb is None and not plain.recipe.skf.enabled
    no_sch = plan(baseline="baseline/snr-net@1", sch="off", skb="skb/hrnet-w48-lite@1")
    assert no_sch.recipe.skf.se and not no_sch.recipe.skf.sch.enabled


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"se": "loss/sch@1"}, "does not fit baseline/snr-net"),  # any se/* variant that builds is fine
        ({"sa": "loss/sa@1"}, "only defined for DRBN-SKF"),
        ({"se": "se/restormer-xattn-dual-gated@1", "skb": "off"}, "needs semantic priors"),
        ({"recipe": "drbn-skf"}, "choose a snr-net recipe"),
        ({"skb": "baseline/drbn@1"}, "must be an 'skb/...' spec"),
        ({"overrides": {"optimizer.lr": -1}}, "optimizer.lr"),
        ({"skb_mode": "sometimes"}, "skf.skb_mode"),
    ],
)
def test_plan_rejects_inconsistent_requests(kwargs: dict[str, Any], message: str) -> None:
    from components.training.plan import plan

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        plan(baseline="baseline/snr-net@1", **kwargs)


def test_config_hash_tracks_what_changes_the_weights() -> None:
    from components.training.job import config_hash
    from components.training.plan import plan

    training_plan = plan(baseline="baseline/snr-net@1", skb="skb/hrnet-w48-lite@1")
    base = {"skb_fingerprint": "f" * 64, "manifest_sha256": "a" * 64, "val_fraction": 0.1}
    digest = config_hash(training_plan, **base)
    assert digest == config_hash(plan(baseline="baseline/snr-net", skb="skb/hrnet-w48-lite"), **base)
    for change in ({"skb_fingerprint": "e" * 64}, {"manifest_sha256": "b" * 64}, {"val_fraction": 0.2}):
        assert config_hash(training_plan, **{**base, **change}) != digest
    reseeded = plan(baseline="baseline/snr-net@1", skb="skb/hrnet-w48-lite@1", overrides={"train.seed": 7})
    assert config_hash(reseeded, **base) != digest


def test_presets_and_prefect_yaml_deployments_validate() -> None:
    """Every deployment of prefect.yaml names a preset whose merged parameters are valid."""
    from flows.commands.pipeline import served_deployments
    from flows.pipeline import SkfTrainParams, available_presets, resolve_params

    trained = ("lol-v1", "lol-v2", "snr-net-lol-v1", "drbn-lol-v2", "demo")
    assert set(trained) <= set(available_presets())
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {*trained, "nightly"}
    pools = {name: d["work_pool"]["name"] for name, d in by_name.items()}
    assert pools == {**dict.fromkeys(trained, "gpu"), "demo": "cpu", "nightly": "gpu"}
    planned = {}
    for name in trained:
        params = SkfTrainParams.model_validate(by_name[name]["parameters"]["params"])
        p = params.plan()
        planned[name] = (p.recipe.name, p.baseline, p.skb)
    # One YAML per run: the preset names the recipe, the recipe says the baseline and the SKB.
    # skf-train/lol-v1 and lol-v2 train the paper's best model; DRBN and SNR-Net stay a preset away.
    assert planned == {
        "lol-v1": ("llflow-l-skf", "baseline/llflow-l@1", "skb/hrnet-w48-pascal@1"),
        "lol-v2": ("llflow-l-skf", "baseline/llflow-l@1", "skb/hrnet-w48-pascal@1"),
        "snr-net-lol-v1": ("snr-net-skf", "baseline/snr-net@1", "skb/hrnet-w48-pascal@1"),
        "drbn-lol-v2": ("drbn-skf", "baseline/drbn@1", "skb/hrnet-w48-pascal@1"),
        "demo": ("demo", "baseline/snr-net@1", "skb/hrnet-w48-lite@1"),
    }
    for name in trained:
        preset = yaml.safe_load((REPO / "configs" / "pipelines" / f"{name}.yaml").read_text())
        assert not {"baseline", "components"} & set(preset) and "overrides" not in preset["training"]
    assert by_name["lol-v2"]["parameters"]["params"]["dataset"]["source"].startswith("s3://")
    nightly = by_name["nightly"]["parameters"]
    resolve_params(
        {"preset": nightly["preset"], **nightly["params"]},
        dataset={
            "source": nightly["data_prefix"],
            "name": nightly["dataset_name"],
            "layout": nightly["layout"],
        },
    )

    served = {d.name: d for d in served_deployments()}
    assert set(served) == set(by_name)
    assert served["demo"].parameters == {"params": {"preset": "demo"}}
    assert [s.schedule.cron for s in served["nightly"].schedules] == ["0 2 * * *"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"components": {"se": "se/nope@1"}}, "unknown component 'se/nope@1'"),
        ({"components": {"skb": "skb/hrnet-w99@1"}}, "unknown component 'skb/hrnet-w99@1'"),
        ({"dataset": {"layout": "lol-v3"}}, "unknown layout 'lol-v3'; choose one of"),
        ({"training": {"overrides": {"train.iterationz": 3}}}, "train.iterationz: unknown key"),
        ({"evaluation": {"protocol": "vibes"}}, "vibes"),
        ({"registry": {"promotion": {"guards": {"fid": 0.1}}}}, "unknown metric 'fid'"),
    ],
)
def test_invalid_parameters_name_the_problem(
    tiny_dataset: Path, change: dict[str, Any], message: str
) -> None:
    from pydantic import ValidationError

    from flows.pipeline import SkfTrainParams

    with pytest.raises((ValidationError, KeyError, ValueError), match=message):
        SkfTrainParams.model_validate(tiny_params(tiny_dataset, **change))


def test_unknown_preset_lists_the_available_ones() -> None:
    from flows.pipeline import SkfTrainParams

    with pytest.raises(
        ValueError,
        match=r"unknown pipeline preset 'nope'; available: demo, drbn-lol-v2, lol-v1, lol-v2, snr-net-lol-v1",
    ):
        SkfTrainParams.model_validate({"preset": "nope"})


# --------------------------------------------------------------------------------------------------
# Flows (Prefect test harness, in-process so the spies see the work)
# --------------------------------------------------------------------------------------------------
def test_invalid_flow_parameters_fail_before_any_work(
    prefect_harness: None, skf_home: Path, tiny_dataset: Path, work: WorkCounter
) -> None:
    from flows.pipeline import skf_train

    bad = tiny_params(tiny_dataset, components={"se": "se/nope@1"})
    with pytest.raises(Exception, match="unknown component 'se/nope@1'; available in kind 'se'"):
        skf_train(params=bad)
    assert _datasets() == []
    assert work == WorkCounter()
    assert not (skf_home / "demo-data").exists()


def _assert_results_are_visible(result: dict[str, Any]) -> None:
    """The evaluation carries the reference rows and the headline, and its labelled grid is a Prefect image
    artifact and a keyed MLflow image (what a person looks at first)."""
    from mlflow import MlflowClient
    from prefect.artifacts import Artifact

    from components.settings import get_settings
    from flows.evaluate import _key

    ev = result["evaluate"]
    assert set(ev["references"]) == {"input", "gamma", "clahe", "hist-eq"}
    assert ev["headline"].startswith("PSNR: model ") and "vs best classic" in ev["headline"]
    assert ev["headline"] in result["summary"] and "reference `gamma`" in result["summary"]
    key = _key(f"eval-{ev['run_id'][:8]}-{ev['protocol']}-{ev['dataset_version']}") + "-grid"
    artifact = Artifact.get(key)
    assert artifact is not None and artifact.type == "image" and artifact.data == ev["grid_uri"]
    client = MlflowClient(get_settings().mlflow_tracking_uri)
    images = [f.path for f in client.list_artifacts(ev["run_id"], "images")]
    # MLflow's image view: key and the step the weights were trained to (4 iterations here)
    assert any(p.startswith("images/eval-") and "+step+4+" in p and p.endswith(".png") for p in images), (
        images
    )


def _skipped_stage_runs() -> dict[str, tuple[str, str]]:
    """Flow runs that ended in a ``Skipped`` state: id -> (flow name, the state's message)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Skipped"]))
            )
        )
        names = {run.flow_id: client.read_flow(run.flow_id).name for run in runs}
        return {str(run.id): (names[run.flow_id], run.state.message) for run in runs}


@pytest.mark.slow
def test_rerun_skips_every_stage(
    prefect_harness: None, skf_home: Path, tiny_dataset: Path, work: WorkCounter
) -> None:
    from mlflow import MlflowClient

    from components.settings import get_settings
    from flows.pipeline import skf_train

    params = tiny_params(tiny_dataset)
    first = skf_train(params=params)
    assert first["ingest"]["created"] and first["ingest"]["ref"] == "tiny@1"
    assert first["priors"]["computed"] == 12 and first["priors"]["forward_passes"] > 0
    assert first["train"]["status"] == "trained" and first["train"]["steps"] == 4
    assert first["evaluate"]["status"] == "evaluated" and "test/psnr" in first["evaluate"]["metrics"]
    assert first["register"]["status"] == "registered" and first["register"]["challenger"]
    assert first["register"]["decision"]["promoted"] is False  # random-init SKB: never promoted
    assert work.train_steps == 4 and work.skb_forwards > 0 and work.registrations == 1
    _assert_results_are_visible(first)

    work.reset()
    before_second = _skipped_stage_runs()
    second = skf_train(params=params)
    assert work == WorkCounter()  # no SKB forward pass, no training step, no registration
    # the UI shows each stage as Skipped, with the reason, not as a "Completed" that implies work
    skipped = {k: v for k, v in _skipped_stage_runs().items() if k not in before_second}
    assert sorted(name for name, _ in skipped.values()) == [
        "evaluate-model",
        "ingest-dataset",
        "precompute-priors",
        "train-model",
    ]
    reasons = dict(skipped.values())
    assert reasons["ingest-dataset"] == "identical content is already tiny@1"
    assert reasons["precompute-priors"] == "all 12 priors cached"
    assert reasons["train-model"].startswith(
        f"finished run {first['train']['run_id']} has this configuration"
    )
    assert not second["ingest"]["created"] and second["ingest"]["ref"] == "tiny@1"
    assert (second["priors"]["computed"], second["priors"]["cached"]) == (0, 12)
    assert second["train"]["status"] == "skipped" and second["train"]["run_id"] == first["train"]["run_id"]
    assert second["evaluate"]["status"] == "skipped"
    assert second["evaluate"]["metrics"] == first["evaluate"]["metrics"]
    assert second["register"]["version"] == first["register"]["version"] == "1"
    assert second["register"]["challenger"]  # read from the version itself: search results lack aliases
    assert "Training**: skipped" in second["summary"]

    client = MlflowClient(get_settings().mlflow_tracking_uri)
    assert client.get_model_version_by_alias("tiny-model", "challenger").run_id == first["train"]["run_id"]


@pytest.mark.slow
def test_rerun_after_a_training_failure_resumes_from_the_checkpoint(
    prefect_harness: None, skf_home: Path, tiny_dataset: Path, work: WorkCounter
) -> None:
    import sqlalchemy as sa

    from components.catalog import TrainingRun, open_catalog
    from flows.pipeline import skf_train

    with pytest.raises(Exception, match="stopped after step 2"):
        skf_train(params=tiny_params(tiny_dataset, training={"stop_after_step": 2}))
    assert work.train_steps == 2
    with open_catalog().session() as session:
        rows = session.scalars(sa.select(TrainingRun)).all()
        assert [r.status for r in rows] == ["failed"]
        digest, run_id = rows[0].config_hash, rows[0].mlflow_run_id
    assert (skf_home / "runs" / digest[:16] / "checkpoints" / "step-00000002.pt").is_file()

    work.reset()
    result = skf_train(params=tiny_params(tiny_dataset))
    assert work.train_steps == 2  # steps 3 and 4 only
    assert result["train"]["status"] == "resumed" and result["train"]["steps"] == 4
    assert result["train"]["run_id"] == run_id and result["train"]["config_hash"] == digest
    assert not result["ingest"]["created"] and result["priors"]["computed"] == 0
    with open_catalog().session() as session:
        assert [r.status for r in session.scalars(sa.select(TrainingRun))] == ["finished"]


@pytest.mark.slow
def test_nightly_retrains_only_when_new_images_arrive(
    prefect_harness: None,
    skf_home: Path,
    tiny_copy: Path,
    work: WorkCounter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    import flows.ingest
    from flows.pipeline import skf_retrain

    ingested: list[str] = []
    real_ingest = flows.ingest.ingest

    def counted_ingest(source: str, **kwargs: Any) -> Any:
        ingested.append(source)
        return real_ingest(source, **kwargs)

    monkeypatch.setattr(flows.ingest, "ingest", counted_ingest)
    config = tiny_params(tiny_copy)
    params = {k: v for k, v in config.items() if k not in ("preset", "dataset")}
    first = skf_retrain(str(tiny_copy), "nightly", layout="lol", preset="demo", params=params)
    assert first["status"] == "retrained" and first["dataset_version"] == "nightly@1"
    assert first["register"]["name"] == "tiny-model"
    assert ingested == [str(tiny_copy)]  # read and hashed once, trained on that version
    # the summary describes this run: the new version it made, not the preset's demo description
    assert first["summary"].startswith("# skf-retrain: done\n\nNew version `nightly@1`")
    assert "Demo on generated data" not in first["summary"]
    assert "unchanged" not in first["summary"] and "**Ingest**: `nightly@1` created" in first["summary"]

    work.reset()
    again = skf_retrain(str(tiny_copy), "nightly", layout="lol", preset="demo", params=params)
    assert again == {"status": "nothing new", "dataset_version": "nightly@1"}
    assert work == WorkCounter()

    for role in ("low", "high"):  # one more training pair
        src = next((tiny_copy / "our485" / role).iterdir())
        shutil.copy(src, tiny_copy / "our485" / role / f"new-{src.name}")
    work.reset()
    third = skf_retrain(str(tiny_copy), "nightly", layout="lol", preset="demo", params=params)
    assert third["status"] == "retrained" and third["dataset_version"] == "nightly@2"
    assert third["changes"]["added"] and third["train"]["status"] == "trained"
    assert work.train_steps == 4 and third["register"]["version"] == "2"


# --------------------------------------------------------------------------------------------------
# CLI: skf train / skf evaluate
# --------------------------------------------------------------------------------------------------
def _cli() -> Any:
    import typer

    from flows.commands.pipeline import register

    app = typer.Typer()
    register(app)
    return app


def test_parse_overrides_reads_yaml_values() -> None:
    from components.errors import UserInputError
    from flows.commands.pipeline import parse_overrides

    assert parse_overrides(["train.iterations=100", "optimizer.lr=2.0e-4", "skf.se=false"]) == {
        "train.iterations": 100,
        "optimizer.lr": 2e-4,
        "skf.se": False,
    }
    with pytest.raises(UserInputError, match="expected KEY=VALUE"):
        parse_overrides(["train.iterations"])
    with pytest.raises(UserInputError, match=r"--set model.nf='!!python/object/apply:os.getcwd \[\]'"):
        parse_overrides(["model.nf=!!python/object/apply:os.getcwd []"])  # safe_load: no tags, no code
    with pytest.raises(UserInputError, match="not a plain YAML value"):
        parse_overrides(["train.iterations=[1, 2"])


def test_cli_train_rejects_a_bad_request_before_work(
    skf_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["train", "tiny@1", "--se", "loss/sch@1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not fit baseline/snr-net" in err and "\n" not in err
    assert _datasets() == []


@pytest.mark.slow
def test_cli_train_then_evaluate(skf_home: Path, tiny_dataset: Path) -> None:
    from typer.testing import CliRunner

    from components.data.ingest import ingest

    ingest(str(tiny_dataset), name="cli", layout="lol")
    runner = CliRunner()
    args = ["train", "cli@1", "--skb", "skb/hrnet-w48-lite@1", "--val-fraction", "0"]
    for key, value in TINY_CLI_OVERRIDES.items():
        args += ["--set", f"{key}={value}"]
    trained = runner.invoke(_cli(), args)
    assert trained.exit_code == 0, trained.output
    assert ": trained" in trained.output
    run_id = re.search(r"MLflow run\W+([0-9a-f]{32})", trained.output).group(1)

    again = runner.invoke(_cli(), args)
    assert again.exit_code == 0 and ": skipped" in again.output

    scored = runner.invoke(_cli(), ["evaluate", run_id, "cli@1"])
    assert scored.exit_code == 0, scored.output
    assert "test/psnr" in scored.output and "grid.png" in scored.output
    missing = runner.invoke(_cli(), ["evaluate", "0" * 32, "cli@1"])
    assert missing.exit_code == 2 and "no model" in missing.output


@pytest.mark.parametrize("preset", ["lol-v1", "lol-v2"])
def test_every_shipped_recipe_runs_on_either_lol_preset(preset: str) -> None:
    """`skf-train/<preset>` with `training.recipe` trains any shipped recipe on that dataset."""
    from components.recipes import available_recipes
    from flows.pipeline import SkfTrainParams

    for recipe in available_recipes():
        if recipe == "demo":
            continue
        params = SkfTrainParams.model_validate(
            {"preset": preset, "dataset": {"source": "s3://skf-data/raw/lol"}, "training": {"recipe": recipe}}
        )
        planned = params.plan()
        assert planned.recipe.name == recipe and params.dataset.layout in ("lol", "lol-v2-real")
