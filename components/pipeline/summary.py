"""The markdown summary of one ``skf-train`` run: per-stage outcome, metrics, promotion and where to look."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from components.pipeline.params import SkfTrainParams

__all__ = ["is_tracking_server", "mlflow_ui", "summary_markdown"]


# --------------------------------------------------------------------------------------------------
def _stage_lines(stages: Mapping[str, Any]) -> list[str]:
    """Ingest, priors and training, one line each."""
    lines: list[str] = []
    ing = stages.get("ingest")
    if ing:
        total = sum(n for roles in ing["counts"].values() for n in roles.values())
        lines += [
            "",
            f"**Ingest**: `{ing['ref']}` {'created' if ing['created'] else 'unchanged'} "
            f"({total} images, {len(ing['quarantined'])} quarantined)",
        ]
    pri = stages.get("priors")
    if pri:
        lines.append(
            f"**Priors** ({pri['skb_spec_resolved']}, fingerprint `{pri['fingerprint'][:12]}`): "
            f"{pri['computed']} computed, {pri['cached']} cached, {pri['failed']} failed, "
            f"{pri['forward_passes']} SKB forward passes"
        )
    elif "priors" in stages:
        lines.append("**Priors**: not cached (the recipe runs the SKB online or uses none)")
    tr = stages.get("train")
    if tr:
        lines.append(
            f"**Training**: {tr['status']}, {tr['steps']} steps, run `{tr['run_id']}`, "
            f"config `{tr['config_hash'][:12]}`, checkpoint `{tr['checkpoint_uri']}`"
        )
    return lines


def _result_lines(stages: Mapping[str, Any]) -> list[str]:
    """The evaluation table and the registration with its promotion decision."""
    lines: list[str] = []
    ev = stages.get("evaluate")
    if ev:
        lines += ["", f"**Evaluation** ({ev['status']}, protocol `{ev['protocol']}`):", ""]
        if ev.get("headline"):
            lines += [f"**{ev['headline']}**", ""]
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(ev["metrics"].items())]
        lines += [f"| {k} | unavailable |" for k in sorted(ev["unavailable"])]
        for name, scores in (ev.get("references") or {}).items():
            shown = ", ".join(f"{m} {v:.4f}" for m, v in sorted(scores.items()) if v is not None)
            lines.append(f"| reference `{name}` | {shown} |")
        lines += ["", f"Labelled crops: {ev['grid_uri']}  ", f"Per-image CSV: {ev['csv_uri']}"]
    reg = stages.get("register")
    if reg:
        lines += [
            "",
            f"**Registry**: `{reg['name']}` version {reg['version']} ({reg.get('status', 'registered')}), "
            f"{'challenger' if reg['challenger'] else 'not challenger (a newer version holds the alias)'}",
        ]
        decision = reg.get("decision")
        if decision:
            verdict = "promoted to champion" if decision["promoted"] else "not promoted"
            lines.append(f"**Promotion**: {verdict}: {decision['reason']}")
        lines += [
            "",
            f"- challenger: `models:/{reg['name']}@challenger`",
            f"- champion: `models:/{reg['name']}@champion`",
        ]
    return lines


def is_tracking_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def mlflow_ui(tracking_uri: str, page: str = "") -> str:
    """``page`` (e.g. ``runs/<id>``) of a tracking server's UI; for a local store, the command that opens
    its UI (``mlflow ui --backend-store-uri`` on a server URI would crash)."""
    if is_tracking_server(tracking_uri):
        return f"{tracking_uri.rstrip('/')}/#/{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def _where_to_look(stages: Mapping[str, Any]) -> list[str]:
    """Links to the run and the model on a tracking server; the ``mlflow ui`` command for a local store."""
    from components.settings import get_settings

    uri = get_settings().mlflow_tracking_uri
    if not is_tracking_server(uri):
        return [f"MLflow UI: `{mlflow_ui(uri)}`"]
    lines = []
    if stages.get("train"):
        lines.append(f"MLflow run: {mlflow_ui(uri, 'runs/' + stages['train']['run_id'])}  ")
    reg = stages.get("register")
    if reg:
        page = f"models/{reg['name']}/versions/{reg['version']}"
        lines.append(f"MLflow model: {mlflow_ui(uri, page)}  ")
    return lines or [f"MLflow: {uri.rstrip('/')}"]


def summary_markdown(
    params: SkfTrainParams,
    stages: Mapping[str, Any],
    error: str | None = None,
    *,
    flow: str = "skf-train",
    lead: str | None = None,
) -> str:
    """What one ``flow`` run did: per-stage outcome, metrics, promotion decision and where to look.

    ``lead`` replaces the preset line (``skf-retrain`` says which new data version it trained on)."""
    lines = [
        f"# {flow}: {'failed' if error else 'done'}",
        "",
        lead or f"Preset `{params.preset or '-'}`; {params.description}".rstrip("; "),
        *_stage_lines(stages),
        *_result_lines(stages),
        "",
        *_where_to_look(stages),
    ]
    if error:
        lines += ["", f"**Failed**: {error}", "", "Rerun with the same parameters to resume from this point."]
    return "\n".join(lines) + "\n"
