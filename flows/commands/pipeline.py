"""``skf train``, ``skf evaluate``, ``skf demo`` and ``skf serve``: the training pipeline from the command line.

``train`` and ``evaluate`` run the same jobs as the ``train-model`` / ``evaluate-model`` flows directly, with a
progress bar (no Prefect API needed). ``demo`` runs the whole ``skf-train`` flow on the demo preset with the
embedded defaults. ``serve`` serves every deployment of ``prefect.yaml`` from this process, under names of
its own (``demo-served``) so it never rewrites what ``prefect deploy`` made.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from components.errors import UserInputError
from flows.commands._progress import progress_bar

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.iterations=100", "optimizer.lr=2e-4"]`` -> ``{"train.iterations": 100, ...}`` (YAML values).

    Values are plain YAML scalars or lists/mappings (``yaml.safe_load``: tags such as ``!!python/object``
    are refused); a malformed item is a :class:`~components.errors.UserInputError` naming it.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserInputError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.iterations=1000")
        out[key] = _override_value(key, value)
    return out


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _override_value(key: str, value: str) -> Any:
    if _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e-6 (no dot) as a string; users mean a number
        return float(value)
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserInputError(
            f"--set {key}={value!r}: not a plain YAML value ({problem}); give a number, string, "
            "true/false, null or a [list], e.g. --set train.iterations=1000"
        ) from None


def _error(console: Console, exc: BaseException) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
    return typer.Exit(code=2)


# --------------------------------------------------------------------------------------------------
# prefect.yaml -> served deployments
# --------------------------------------------------------------------------------------------------
def _load_flow(entrypoint: str) -> Any:
    """``flows/pipeline.py:skf_train`` -> the flow object, imported as a package module."""
    path, _, name = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


#: Appended to the prefect.yaml names by ``skf serve``: a served deployment has no pull steps and an
#: entrypoint relative to the serving shell, so sharing a name would rewrite the pool deployment in place.
SERVED_SUFFIX = "-served"


def served_deployments(
    path: Path = PREFECT_YAML, names: list[str] | None = None, name_suffix: str = ""
) -> list[Any]:
    """``flow.to_deployment(...)`` for each deployment of ``path`` (all, or those in ``names``, the
    prefect.yaml names), each named ``<name><name_suffix>``; ``skf serve`` passes :data:`SERVED_SUFFIX`."""
    from prefect.schedules import Cron

    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    entries = spec.get("deployments") or []
    known = [d["name"] for d in entries]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ValueError(f"no deployment {unknown} in {path}; it defines {known}")
    out = []
    for entry in entries:
        if names and entry["name"] not in names:
            continue
        schedules = [
            Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
            for s in entry.get("schedules") or []
            if "cron" in s
        ]
        out.append(
            _load_flow(entry["entrypoint"]).to_deployment(
                name=f"{entry['name']}{name_suffix}",
                description=entry.get("description"),
                tags=list(entry.get("tags") or []),
                parameters=dict(entry.get("parameters") or {}),
                schedules=schedules or None,
            )
        )
    return out


def pool_deployments_in_the_way(deployments: list[Any]) -> list[str]:
    """``flow/name (work pool 'gpu')`` for each of ``deployments`` whose name the Prefect server already
    holds as a work-pool deployment (made by ``prefect deploy``): serving it would overwrite that one."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    clashes = []
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            try:
                existing = client.read_deployment_by_name(deployment.full_name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                clashes.append(f"{deployment.full_name} (work pool {existing.work_pool_name!r})")
    return clashes


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------
def _with_request_options(command: Any) -> Any:
    """Give ``command`` the argument VERSION_REF, one ``--option`` per training request field (type,
    default and help from :class:`~components.training.plan.TrainingRequest`) and ``--set``."""
    from components.training.plan import TrainingRequest

    def option(name: str, default: Any, annotation: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    version_ref = typer.Argument(..., help="Dataset version, e.g. lol@2 (or lol for the latest).")
    params = [
        inspect.Parameter(
            "version_ref", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=version_ref, annotation=str
        ),
        *(
            option(name, typer.Option(field.default, help=field.description), field.annotation)
            for name, field in TrainingRequest.model_fields.items()
            if name != "overrides"  # --set
        ),
        option(
            "override", typer.Option([], "--set", help="Recipe override KEY=VALUE (repeatable)."), list[str]
        ),
    ]
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


@_with_request_options
def train_command(version_ref: str, override: list[str], **fields: Any) -> None:
    """Train (or resume, or reuse) a model on VERSION_REF; prints the MLflow run and checkpoint.

    Every option but --set is a field of the training request (components.training.plan.TrainingRequest);
    --set KEY=VALUE overrides the recipe.
    """
    # Failures are SKFErrors, left to the CLI boundary (flows.cli.main): one `error:` line on stderr.
    from components.training.job import run_training
    from components.training.plan import plan

    console = Console()
    training_plan = plan(fields, overrides=parse_overrides(override))
    with progress_bar(console) as bar:
        task_id = bar.add_task("training", total=training_plan.recipe.train.iterations, info="")

        def progress(p: Any) -> None:
            shown = {**p.metrics, **(p.val_metrics or {})}
            info = " ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:4])
            bar.update(task_id, completed=p.step, info=info)

        outcome = run_training(
            version_ref,
            training_plan,
            progress=progress,
            log=lambda msg: bar.console.print(msg, soft_wrap=True),
        )
    console.print(outcome_table(training_plan.recipe.name, outcome))


def outcome_table(recipe: str, outcome: Any) -> Table:
    table = Table(title=f"{recipe} on {outcome.dataset_version}: {outcome.status}")
    table.add_column("")
    table.add_column("", overflow="fold")
    for key, value in (
        ("MLflow run", outcome.run_id),
        ("checkpoint", outcome.checkpoint_uri),
        ("config hash", outcome.config_hash),
        ("steps", str(outcome.steps)),
        *((k, f"{v:.4f}") for k, v in sorted(outcome.metrics.items())),
    ):
        table.add_row(key, value)
    return table


def evaluate_command(
    model: str = typer.Argument(..., help="Training run id or models:/<name>@<alias> | models:/<name>/<n>."),
    version_ref: str = typer.Argument(..., help="Dataset version whose test split is scored."),
    protocol: str = typer.Option("raw", help="raw, gt-mean, paper or paper-gt-mean."),
    unpaired: list[str] = typer.Option(
        [], "--unpaired", help="Unpaired dataset version for NIQE (repeatable)."
    ),
    device: str | None = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    force: bool = typer.Option(
        False, "--force", help="Recompute an evaluation already recorded on the run and overwrite it."
    ),
) -> None:
    """Score MODEL on VERSION_REF's test pairs (PSNR, SSIM, LPIPS, NIQE) and log the results to its run.

    An evaluation already recorded (same protocol and dataset versions) is shown, not repeated; --force
    recomputes it, e.g. once the weights of an unavailable metric are installed.
    """
    from components.errors import SKFError
    from components.evaluation.job import run_evaluation

    console = Console()
    try:
        with progress_bar(console) as bar:
            task_id = bar.add_task("enhancing", total=None, info="")
            result = run_evaluation(
                model,
                version_ref,
                protocol,
                unpaired,
                device=device,
                force=force,
                progress=lambda done, total: bar.update(task_id, completed=done, total=total),
                log=lambda msg: bar.console.print(msg, soft_wrap=True, markup=False),
            )
    except (SKFError, LookupError, ValueError) as exc:
        # Also the error boundary under CliRunner (tests), where flows.cli.main is not in the way.
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(getattr(exc, "exit_code", 2)) from exc
    console.print(metrics_table(result))
    console.print(result.get("headline", ""), soft_wrap=True, markup=False)
    console.print(f"per-image scores: {result['csv_uri']}\ncrops: {result['grid_uri']}", soft_wrap=True)


def metrics_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"{result['dataset_version']}, protocol {result['protocol']} ({result['status']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("note", overflow="fold")
    for key, value in sorted(result["metrics"].items()):
        table.add_row(key, f"{value:.4f}", "")
    for key, why in sorted(result["unavailable"].items()):
        table.add_row(key, "unavailable", why)
    for name, scores in (result.get("references") or {}).items():
        for metric, value in sorted(scores.items()):
            table.add_row(metric, "n/a" if value is None else f"{value:.4f}", f"reference: {name}")
    return table


def demo_command(
    iterations: int | None = typer.Option(None, help="Training iterations (default: the demo preset's)."),
) -> None:
    """Run the whole pipeline on generated demo data: ingest, priors, train, evaluate, register."""
    # Before Prefect is imported: the ephemeral API keeps its SQLite file in PREFECT_HOME, which must exist
    # (its longer start-up timeout is set for every flows process in flows.env).
    Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser().mkdir(parents=True, exist_ok=True)
    from components.pipeline.summary import mlflow_ui
    from components.settings import get_settings
    from flows.pipeline import resolve_params, skf_train

    console = Console()
    settings = get_settings()
    overrides = {"training": {"overrides": {"train.iterations": iterations}}} if iterations else {}
    params = resolve_params({"preset": "demo", **overrides})
    console.print(f"SKF demo in {settings.home} (catalog, store and MLflow runs live there)")
    result = skf_train(params=params)
    reg, ev = result["register"], result["evaluate"]
    console.print(metrics_table(ev))
    decision = reg.get("decision") or {}
    console.print(
        "\n".join(
            [
                f"result:           {ev.get('headline', '')}",
                f"sample grid:      {ev['grid_uri']}  (input | output | reference, PSNR per image)",
                f"registered model: models:/{reg['name']}/{reg['version']}  "
                f"(alias: models:/{reg['name']}@challenger)",
                f"champion alias:   models:/{reg['name']}@champion -- "
                + ("this model" if decision.get("promoted") else "not set by this run"),
                f"promotion:        {decision.get('reason', 'not attempted')}",
                "note: the demo SKB is randomly initialised (no HRNet checkpoint offline), so the demo model "
                "is registered as challenger and never promoted to champion.",
                "MLflow UI:        "
                + mlflow_ui(settings.mlflow_tracking_uri, f"models/{reg['name']}/versions/{reg['version']}"),
                f"enhance images:   skf enhance --model models:/{reg['name']}@challenger IN OUT",
            ]
        ),
        soft_wrap=True,
    )


def serve_command(
    name: list[str] = typer.Option(
        [], "--name", "-n", help="Serve only this prefect.yaml deployment (repeatable)."
    ),
    file: Path = typer.Option(PREFECT_YAML, "--file", help="The prefect.yaml to read."),
    name_suffix: str = typer.Option(
        SERVED_SUFFIX, "--name-suffix", help="Appended to each name, e.g. skf-train/demo-served."
    ),
) -> None:
    """Serve the deployments of prefect.yaml from this process (local use; no work pools needed).

    They are served as <name><suffix>, never under the names `prefect deploy` uses; a name the server
    already holds as a work-pool deployment is refused rather than overwritten.
    """
    from prefect import serve

    console = Console()
    try:
        deployments = served_deployments(file, name or None, name_suffix=name_suffix)
    except (ValueError, OSError) as exc:
        raise _error(console, exc) from exc
    clashes = pool_deployments_in_the_way(deployments)
    if clashes:
        raise _error(
            console,
            UserInputError(
                f"refusing to serve {', '.join(clashes)}: the Prefect server holds it as a work-pool "
                "deployment (from `prefect deploy`) that serving would overwrite; choose another --name-suffix"
            ),
        )
    serve(*deployments)


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("demo")(demo_command)
    app.command("serve")(serve_command)
