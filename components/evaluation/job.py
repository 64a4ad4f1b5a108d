"""The evaluation job: score a trained run or a registered model on a dataset version (no Prefect).

The model is a training run id (its ``enhancer-package`` artifacts) or an MLflow model URI
(``models:/name@alias``, ``models:/name/3``). Paired metrics are computed on the version's test split, NIQE
on the unpaired sets named in ``unpaired_refs``. Everything lands on the MLflow run behind the model:
aggregate metrics, the protocol record, a per-image CSV, a grid of input/output/reference crops and a
markdown report. An evaluation already recorded on the run (same protocol, same dataset versions) is not
repeated unless ``force`` is set (``skf evaluate --force``), which recomputes it and overwrites the recorded
result -- e.g. after installing the weights of a metric that was unavailable.

Nothing is left in the temp folder: the model is loaded from a download that is deleted right after.
The ``evaluate-model`` flow and ``skf evaluate`` both call :func:`run_evaluation`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from components.errors import SKFError, UserInputError
from components.evaluation.grid import GRID_IMAGES, labelled_grid
from components.evaluation.references import headline, score_references
from components.model_registry import ModelNotFoundError, check_model_uri
from components.progress import ProgressCallback
from components.tracking import mlflow_client

__all__ = [
    "EVAL_TAG",
    "DatasetObjectError",
    "ModelNotFoundError",
    "ModelRef",
    "eval_key",
    "evaluation_markdown",
    "load_model",
    "metric_table",
    "resolve_model",
    "run_evaluation",
]

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
EVAL_TAG = "skf.eval."


class DatasetObjectError(SKFError):
    """A stored dataset image cannot be used (its bytes no longer match the catalog's sha256)."""


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """What to evaluate and where to record it."""

    uri: str  # as given: a run id or an MLflow model URI
    run_id: str  # the training run the results are logged to
    registered: str | None = None  # "name/version" for registered models


def resolve_model(client: Any, model: str) -> ModelRef:
    """A run id or ``models:/name@alias`` / ``models:/name/version`` -> the run behind it.

    Unknown runs, names, aliases and versions raise :class:`ModelNotFoundError` listing what exists.
    """
    if _RUN_ID.match(model):
        try:
            check_model_uri(client, f"runs:/{model}")
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(
                f"no model {model!r}: no MLflow run with that id at {client.tracking_uri}; pass the run id "
                "`skf train` printed, or models:/<name>@<alias> | models:/<name>/<version>"
            ) from exc
        return ModelRef(model, model)
    mv = check_model_uri(client, model) if model.startswith("models:/") else None
    if mv is None:
        raise ModelNotFoundError(
            f"cannot evaluate {model!r}: pass a training run id (32 hex) or models:/<name>@<alias> | /<version>"
        )
    if not mv.run_id:
        raise ModelNotFoundError(f"{model} was not logged from a run; evaluate it by run id")
    return ModelRef(model, mv.run_id, f"{mv.name}/{mv.version}")


def load_model(ref: ModelRef, device: str | torch.device) -> Any:
    """The enhancer behind ``ref``: the run's enhancer package, or the registered pyfunc's weights."""
    if ref.registered is None:
        from components.model_registry import PACKAGE_PATH, load_enhancer_package

        return load_enhancer_package(f"runs:/{ref.run_id}/{PACKAGE_PATH}", device=str(device)).eval()
    from components.serving import load_enhancer

    return load_enhancer(ref.uri, device=device)


def _tensor(record: Any, version_ref: str = "the dataset") -> torch.Tensor:
    """The stored image as (3, H, W) float in [0, 1]; a corrupt object is a one-line error naming it."""
    from components.data.torch_dataset import load_rgb
    from components.storage import IntegrityError

    try:
        rgb = load_rgb(record)
    except IntegrityError as exc:
        raise DatasetObjectError(
            f"dataset object {record.uri} (image {record.pair_key!r} of {version_ref}) does not match its "
            f"recorded sha256 {record.sha256[:12]}...: it is corrupt or was replaced; restore it or re-ingest "
            "the dataset (`skf ingest SOURCE --name NAME`) and evaluate the new version"
        ) from exc
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0)


@torch.inference_mode()
def _enhance(
    enhancer: Any,
    images: Sequence[torch.Tensor],
    device: torch.device,
    progress: ProgressCallback | None = None,
    labels: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """One image at a time (sizes differ across sets); ``progress(done, total)`` after each. ``labels``
    (one (H, W) map per image) feed an enhancer whose SKB is made from label maps (the oracle)."""
    outs = []
    for i, x in enumerate(images):
        extra = {} if labels is None else {"labels": labels[i].unsqueeze(0).to(device)}
        outs.append(enhancer(x.unsqueeze(0).to(device), **extra)[0].float().cpu())
        if progress is not None:
            progress(len(outs), len(images))
    return outs


def _labels_for(enhancer: Any, version: Any, lows: Sequence[Any]) -> list[torch.Tensor] | None:
    """The test pairs' label maps when the enhancer's SKB needs them (else ``None``); missing ones are an error."""
    if not getattr(enhancer, "needs_labels", False):
        return None
    from components.data.torch_dataset import load_label

    records = [version.label_of(low) for low in lows]
    missing = [low.pair_key for low, rec in zip(lows, records, strict=True) if rec is None]
    if missing:
        raise UserInputError(
            f"the model's SKB makes its priors from label maps, but {version.ref} has none for "
            f"{len(missing)} test pair(s) (e.g. {missing[0]!r}); evaluate it on a labelled dataset version"
        )
    return [torch.from_numpy(load_label(rec)).long() for rec in records]


def eval_key(protocol: str, version_ref: str, unpaired: Sequence[str]) -> str:
    """Tag-safe name of one evaluation: protocol and every dataset version it covers."""
    parts = [protocol, version_ref.replace("@", ".v"), *(u.replace("@", ".v") for u in unpaired)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(parts))


def _split_name(split: str, protocol: str) -> str:
    return split if protocol == "raw" else f"{split}-{protocol}"


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Inputs:
    """What one evaluation scores: the model, the test pairs and the unpaired sets."""

    ref: ModelRef
    version: Any
    unpaired: list[Any]
    key: str
    previous: dict[str, Any] | None
    pairs: list[Any] = dataclasses.field(default_factory=list)
    unpaired_records: list[list[Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Scores:
    """The model's reports (test split first), the references' test reports, the grid's rows."""

    reports: list[Any]
    references: dict[str, Any]
    grid_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    def grid(self) -> Any:
        """The labelled grid, with each row's input and output PSNR from the reports."""
        test, given = self.reports[0], self.references.get("input")
        n = len(self.grid_rows)
        psnr_out = [row.get("psnr") for row in test.rows[:n]]
        psnr_in = [row.get("psnr") for row in given.rows[:n]] if given is not None else None
        return labelled_grid(self.grid_rows, psnr_in, psnr_out)

    def reference_aggregates(self) -> dict[str, dict[str, float | None]]:
        return {name: dict(r.aggregates) for name, r in self.references.items()}


def _inputs(
    client: Any, model: str, version_ref: str, protocol: str, unpaired_refs: Sequence[str]
) -> _Inputs:
    from components.data.ingest import get_version
    from components.evaluation import get_protocol

    ref = resolve_model(client, model)
    version = get_version(version_ref)
    unpaired = [get_version(u) for u in unpaired_refs]
    key = eval_key(get_protocol(protocol).name, version.ref, [u.ref for u in unpaired])
    done = client.get_run(ref.run_id).data.tags.get(EVAL_TAG + key)
    return _Inputs(ref, version, unpaired, key, json.loads(done) if done else None)


def _check_data(inputs: _Inputs) -> None:
    """Load the record lists; a version without test pairs or unpaired images is a user error."""
    inputs.pairs = inputs.version.pairs("test")
    if not inputs.pairs:
        raise UserInputError(
            f"{inputs.version.ref} has no test pairs to evaluate on; ingest a layout with a test split"
        )
    inputs.unpaired_records = [uv.records(role="unpaired") for uv in inputs.unpaired]
    for uv, records in zip(inputs.unpaired, inputs.unpaired_records, strict=True):
        if not records:
            raise UserInputError(f"{uv.ref} has no unpaired images; ingest it with --layout unpaired")


def _score(
    inputs: _Inputs,
    protocol: str,
    metrics: Sequence[str] | None,
    dev: torch.device,
    progress: ProgressCallback | None,
    log: Callable[[str], None],
) -> _Scores:
    """Enhance every image, score it and the classic references; the reports and the grid rows."""
    from components.evaluation import (
        PAIRED_DEFAULT,
        UNPAIRED_DEFAULT,
        evaluate_pairs,
        evaluate_unpaired,
        get_protocol,
    )

    version, pairs = inputs.version, inputs.pairs
    enhancer = load_model(inputs.ref, dev)
    total = len(pairs) + sum(len(r) for r in inputs.unpaired_records)
    offset = [0]

    def step(done: int, _n: int) -> None:
        if progress is not None:
            progress(offset[0] + done, total)

    lows = [_tensor(low, version.ref) for low, _ in pairs]
    highs = [_tensor(high, version.ref) for _, high in pairs]
    if getattr(enhancer, "needs_labels", False) and inputs.unpaired:
        raise UserInputError(
            "the model's SKB makes its priors from ground-truth label maps: it cannot enhance the unpaired "
            "(unlabelled) sets; evaluate it without --unpaired"
        )
    labels = _labels_for(enhancer, version, [low for low, _ in pairs])
    outs = _enhance(enhancer, lows, dev, step, labels)
    offset[0] = len(pairs)
    log(f"enhanced {len(outs)} test images of {version.ref} with {inputs.ref.uri}")
    names = [low.pair_key for low, _ in pairs]
    split = _split_name("test", protocol)
    paired_metrics = tuple(metrics or PAIRED_DEFAULT)
    reports = [evaluate_pairs(outs, highs, protocol, paired_metrics, names=names, device=dev, split=split)]
    for side in _side_protocols(enhancer, protocol):  # LLFlow: GT-mean next to raw, as its paper rows
        log(f"also scoring under {side} (the protocol of this baseline's published numbers)")
        reports.append(
            evaluate_pairs(
                outs, highs, side, paired_metrics, names=names, device=dev, split=_split_name("test", side)
            )
        )
    log(f"scoring the classic references (input, gamma, CLAHE, histogram equalisation) under {protocol}")
    references = score_references(lows, highs, protocol, paired_metrics, names=names, device=dev, split=split)
    unpaired_protocol = protocol if get_protocol(protocol).brightness == "none" else "raw"
    for uv, records in zip(inputs.unpaired, inputs.unpaired_records, strict=True):
        outputs = _enhance(enhancer, [_tensor(r, uv.ref) for r in records], dev, step)
        offset[0] += len(records)
        reports.append(
            evaluate_unpaired(
                outputs,
                unpaired_protocol,
                UNPAIRED_DEFAULT,
                names=[r.pair_key for r in records],
                device=dev,
                split=_split_name(uv.name, unpaired_protocol),
            )
        )
    return _Scores(reports, references, list(zip(lows, outs, highs, strict=True))[:GRID_IMAGES])


def _side_protocols(enhancer: Any, protocol: str) -> list[str]:
    """The family's extra protocols (``side_protocols``) other than the requested one."""
    from components.evaluation import get_protocol

    family = getattr(enhancer, "family", None)
    wanted = get_protocol(protocol).name
    return [p for p in getattr(family, "side_protocols", ()) if get_protocol(p).name != wanted]


def comparison_lines(
    headline: str,
    metrics: Sequence[str],
    model: Mapping[str, float | None],
    references: Mapping[str, Mapping[str, float | None]],
) -> list[str]:
    """The headline, then the model's row beside each classic reference's over ``metrics`` (markdown)."""

    def cells(values: Mapping[str, float | None]) -> str:
        return " | ".join("n/a" if values.get(m) is None else f"{values[m]:.4f}" for m in metrics)

    lines = [
        f"**{headline}**",
        "",
        "| enhancer | " + " | ".join(metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    lines.append(f"| **model** | {cells(model)} |")
    lines += [f"| {name} | {cells(values)} |" for name, values in references.items()]
    return lines


def _reference_metrics(scores: _Scores) -> dict[str, float]:
    """``reference/<name>/<split>/<metric>`` for every finite reference aggregate."""
    return {
        f"reference/{name}/{key}": value
        for name, r in scores.references.items()
        for key, value in r.mlflow_metrics().items()
        if not key.endswith("/num_images")
    }


def _last_step(client: Any, run_id: str) -> int:
    """The step the evaluated weights were trained to (the grid's MLflow image step); 0 if unknown."""
    value = client.get_run(run_id).data.params.get("recipe.train.iterations", "0")
    return int(value) if value.isdigit() else 0


def _record(client: Any, inputs: _Inputs, protocol: str, scores: _Scores) -> tuple[dict[str, Any], str]:
    """Log the artifacts, metrics and tags on the run; returns the evaluation summary and the per-set
    metric tables (the report file also opens with the model-vs-references comparison, which
    :func:`evaluation_markdown` shows from the summary)."""
    from mlflow.entities import Metric, RunTag

    from components.evaluation import get_protocol

    ref, key, reports = inputs.ref, inputs.key, scores.reports
    values = {k: v for r in reports for k, v in r.mlflow_metrics().items()}
    unavailable = {f"{r.split}/{m}": u.reason[:300] for r in reports for m, u in r.unavailable.items()}
    references = scores.reference_aggregates()
    line = headline(reports[0].aggregates, references)
    comparison = comparison_lines(line, reports[0].metrics, reports[0].aggregates, references)
    markdown = "\n".join(r.to_markdown() for r in reports)
    folder = f"eval/{key}"
    grid = scores.grid()
    with tempfile.TemporaryDirectory(prefix="skf-eval-") as tmp:
        out = Path(tmp)
        for r in reports:
            r.to_csv(out / f"{r.split}-per_image.csv")
        for name, r in scores.references.items():
            r.to_csv(out / "references" / f"{name}-{r.split}-per_image.csv")
        grid.save(out / "grid.png")
        (out / "report.md").write_text("\n".join([*comparison, "", markdown]))
        client.log_artifacts(ref.run_id, str(out), folder)
    # MLflow's image view: the grid as a keyed, stepped image beside the run's training sample grids.
    client.log_image(ref.run_id, grid, key=f"eval-{key}", step=_last_step(client, ref.run_id))
    base = f"{client.get_run(ref.run_id).info.artifact_uri}/{folder}"
    summary = {
        "model": ref.uri,
        "run_id": ref.run_id,
        "registered": ref.registered,
        "dataset_version": inputs.version.ref,
        "unpaired_versions": [u.ref for u in inputs.unpaired],
        "protocol": get_protocol(protocol).name,
        "metrics": values,
        "unavailable": unavailable,
        "references": references,
        "headline": line,
        "csv_uri": f"{base}/{reports[0].split}-per_image.csv",
        "grid_uri": f"{base}/grid.png",
        "report_uri": f"{base}/report.md",
    }
    tags = {f"eval.{key}/{k}": v for k, v in reports[0].mlflow_params().items()}
    tags.update(reports[0].mlflow_tags())
    tags[EVAL_TAG + key] = json.dumps(summary, sort_keys=True)
    now = int(time.time() * 1000)  # a forced rerun's values become the latest ones
    client.log_batch(
        ref.run_id,
        metrics=[Metric(k, v, now, 0) for k, v in {**values, **_reference_metrics(scores)}.items()],
        tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()],
    )
    _drop_stale_unavailable(client, ref.run_id, inputs.previous, reports)
    return summary, markdown


def run_evaluation(
    model: str,
    version_ref: str,
    protocol: str = "raw",
    unpaired_refs: Sequence[str] = (),
    *,
    metrics: Sequence[str] | None = None,
    device: str | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``version_ref``'s test pairs (and NIQE on ``unpaired_refs``); see the module doc.

    ``progress(done, total)`` follows the enhanced images over all sets. A recorded evaluation is
    returned as ``skipped`` unless ``force``, which recomputes it and overwrites the record.
    """
    client = mlflow_client()
    inputs = _inputs(client, model, version_ref, protocol, unpaired_refs)
    previous = inputs.previous
    if previous is not None and not force:
        missing = len(previous.get("unavailable") or {})
        why = f"; {missing} metric(s) were unavailable" if missing else ""
        log(
            f"evaluation skipped: run {inputs.ref.run_id} already holds {inputs.key}{why} (--force recomputes it)"
        )
        return {**previous, "status": "skipped"}
    if previous is not None:
        log(
            f"re-evaluating {inputs.key} on run {inputs.ref.run_id} (forced); the recorded result is overwritten"
        )
    _check_data(inputs)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scores = _score(inputs, protocol, metrics, dev, progress, log)
    summary, markdown = _record(client, inputs, protocol, scores)
    log(summary["headline"])
    return {**summary, "status": "evaluated", "markdown": markdown}


def _drop_stale_unavailable(
    client: Any, run_id: str, previous: dict[str, Any] | None, reports: list[Any]
) -> None:
    """After a forced rerun, remove ``eval/unavailable/<metric>`` tags of metrics that are now computed."""
    if not previous:
        return
    still = {m for r in reports for m in r.unavailable}
    before = {name.rsplit("/", 1)[-1] for name in previous.get("unavailable") or {}}
    tags = client.get_run(run_id).data.tags
    for metric in sorted(before - still):
        if f"eval/unavailable/{metric}" in tags:
            client.delete_tag(run_id, f"eval/unavailable/{metric}")


# --------------------------------------------------------------------------------------------------
# Presentation (the flow's artifacts)
# --------------------------------------------------------------------------------------------------
def metric_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for a table artifact: every metric, unavailable ones with their reason, then the references'."""
    rows = [{"metric": k, "value": round(v, 4), "note": ""} for k, v in sorted(result["metrics"].items())]
    rows += [
        {"metric": k, "value": None, "note": why[:200]} for k, why in sorted(result["unavailable"].items())
    ]
    for name, scores in (result.get("references") or {}).items():
        rows += [
            {"metric": f"{m}", "value": None if v is None else round(v, 4), "note": f"reference: {name}"}
            for m, v in sorted(scores.items())
        ]
    return rows


def _reference_lines(result: dict[str, Any]) -> list[str]:
    """The model's test row beside the classic references (none on results recorded before they existed)."""
    references = result.get("references") or {}
    if not references:
        return []
    split = next((k.split("/")[0] for k in result["metrics"] if k.endswith("/psnr")), "test")
    metrics = sorted({m for scores in references.values() for m in scores})
    model = {m: result["metrics"].get(f"{split}/{m}") for m in metrics}
    return ["", *comparison_lines(result.get("headline", ""), metrics, model, references)]


def evaluation_markdown(result: dict[str, Any]) -> str:
    """The evaluation summary as markdown: metrics, the reference rows and where the files are."""
    lines = [
        f"# Evaluation of `{result['model']}` on `{result['dataset_version']}` ({result['status']})",
        "",
        f"Protocol `{result['protocol']}`; MLflow run `{result['run_id']}`"
        + (f" (registered {result['registered']})" if result.get("registered") else ""),
        *_reference_lines(result),
        "",
        "| metric | value |",
        "|---|---:|",
        *(f"| {k} | {v:.4f} |" for k, v in sorted(result["metrics"].items())),
        *(f"| {k} | unavailable: {why} |" for k, why in sorted(result["unavailable"].items())),
        "",
        f"- labelled crops (input / output / reference, PSNR per image): [{result['grid_uri']}]({result['grid_uri']})",
        f"- per-image scores: [{result['csv_uri']}]({result['csv_uri']})",
        f"- full report: [{result['report_uri']}]({result['report_uri']})",
    ]
    return "\n".join(lines) + "\n"
