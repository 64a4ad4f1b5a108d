"""Learning evidence: does every registered baseline family learn, plain and with SKF, on the generated pairs?

For each family in the registry (``components.baselines.families()``) and each variant (``plain``: the
baseline recipe; ``skf``: its SKF recipe with priors of the demo SKB cached once, SA off unless ``--sa``),
this trains the family's smallest network (``family.smoke_model``) for a fixed budget on the CPU through the
real jobs: the demo dataset is generated and ingested into a scratch ``SKF_HOME``, priors are precomputed,
:func:`components.training.job.run_training` trains (one MLflow run per model, the validation PSNR/SSIM
curve logged by the engine) and :func:`components.evaluation.job.run_evaluation` scores the test split with
the classic reference rows beside the model. The result is a markdown table, written into
``benchmarks/RESULTS.md`` between the ``learning`` markers with ``--write-results``.

    python benchmarks/learning.py                        # every family, plain and SKF, default budget
    python benchmarks/learning.py --families snr-net --variants skf --steps 600 --set optimizer.lr=5e-4

``tests/test_learning.py`` runs a small budget of the same code and asserts that every family beats its
input on the validation split by a measured margin.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
VARIANTS = ("plain", "skf")
DEMO_SKB = "skb/hrnet-w48-lite@1"


@dataclasses.dataclass(frozen=True)
class Budget:
    """The same training budget for every family: steps, batch, crop, learning rate and schedule."""

    steps: int = 400
    batch_size: int = 8
    crop: int = 64
    lr: float = 5e-4
    val_every: int = 50
    decay_at: float = 0.75  # one x0.2 learning-rate step at this fraction of the steps

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Budget:
        return cls(args.steps, args.batch_size, args.crop, args.lr, args.val_every)

    def overrides(self) -> dict[str, Any]:
        milestone = max(1, int(self.steps * self.decay_at))
        return {
            "train.iterations": self.steps,
            "train.batch_size": self.batch_size,
            "train.crop": self.crop,
            "train.val_every": min(self.val_every, self.steps),
            "train.ckpt_every": self.steps,
            "optimizer.lr": self.lr,
            "scheduler": {
                "name": "multistep",
                "milestones": [milestone],
                "step_size": None,
                "gamma": 0.2,
                "warmup": 0,
            },
        }


@dataclasses.dataclass
class LearningResult:
    """One trained model: its curve on the validation split and its test scores beside the references."""

    family: str
    variant: str
    run_id: str
    seconds: float
    val_input_psnr: float
    val_curve: list[tuple[int, float, float | None]]  # (step, PSNR, SSIM)
    test: dict[str, float | None]
    references: dict[str, dict[str, float | None]]
    headline: str

    @property
    def final_val_psnr(self) -> float:
        return self.val_curve[-1][1]

    @property
    def margin_db(self) -> float:
        """Final validation PSNR above the input's (what the learning test asserts)."""
        return self.final_val_psnr - self.val_input_psnr


# --------------------------------------------------------------------------------------------------
# Data: the demo pairs, ingested and with priors cached once for all models
# --------------------------------------------------------------------------------------------------
def prepare_data(
    pairs_per_photo: int = 6, seed: int = 0, skb: str | None = DEMO_SKB, name: str = "learning"
) -> str:
    """Generate, ingest and (for SKF) precompute; returns the dataset version ref. Uses ``$SKF_HOME``."""
    from components.data.demo import generate_demo_dataset
    from components.data.ingest import ingest
    from components.precompute import precompute_priors
    from components.settings import get_settings

    root = get_settings().home / f"{name}-data"
    if not (root / "our485").is_dir():
        generate_demo_dataset(root, seed=seed, pairs_per_photo=pairs_per_photo, overwrite=True)
    ref = ingest(str(root), name=name, layout="lol").ref
    if skb is not None:
        precompute_priors(ref, skb, splits=("train", "test"))
    return ref


def _input_psnr(version_ref: str, training_plan: Any) -> float:
    """PSNR of the low-light inputs of the validation split the engine carves (same records, same seed)."""
    from components.data.ingest import get_version
    from components.training.job import _datasets
    from components.training.routines import psnr

    _, val_loader = _datasets(get_version(version_ref), training_plan)
    values = [float(psnr(batch["low"], batch["high"])) for batch in val_loader]
    return sum(values) / len(values)


def run_seconds(client: Any, run_id: str) -> float:
    """Wall time of the training run as MLflow recorded it (also right for a run reused by a rerun)."""
    info = client.get_run(run_id).info
    return max(0.0, ((info.end_time or info.start_time) - info.start_time) / 1000.0)


def val_curve(client: Any, run_id: str) -> list[tuple[int, float, float | None]]:
    """The validation (step, PSNR, SSIM) points the engine logged (a staged run: its final stage's,
    ``<stage>/val/psnr``; the earlier stages validate their decomposition instead)."""
    keys = [k for k in client.get_run(run_id).data.metrics if k == "val/psnr" or k.endswith("/val/psnr")]
    prefix = "" if "val/psnr" in keys or not keys else keys[0].removesuffix("val/psnr")
    psnrs = {m.step: m.value for m in client.get_metric_history(run_id, f"{prefix}val/psnr")}
    ssims = {m.step: m.value for m in client.get_metric_history(run_id, f"{prefix}val/ssim")}
    return [(step, psnrs[step], ssims.get(step)) for step in sorted(psnrs)]


# --------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------
def smoke_plan(
    family: Any,
    budget: Budget,
    *,
    skb: str | None = None,
    checkpoint: str | None = None,
    se: bool = True,
    sch: bool = True,
    sa: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """The plan of ``family``'s smallest network at ``budget``: plain without ``skb``, else its SKF recipe
    on cached priors of the low-light input with the chosen modules (SA only where the family has it).
    A staged family's final stage trains ``budget.steps``; its earlier stages add theirs
    (``family.smoke_stage_steps``)."""
    from components.training.plan import plan

    overrides = {
        **budget.overrides(),
        **family.smoke_steps(budget.steps),
        **{f"model.{k}": v for k, v in family.smoke_model.items()},
        **family.smoke_recipe,
    }
    if skb is None:
        return plan(
            baseline=family.spec, recipe=family.name, skb="off", overrides={**overrides, **(extra or {})}
        )
    overrides["skf.skb_input"] = "lq"  # cached priors are the low-light input's
    return plan(
        baseline=family.spec,
        recipe=f"{family.name}-skf",
        skb=skb,
        skb_checkpoint=checkpoint,
        skb_mode="cached",
        se=None if se else "off",
        sch=None if sch else "off",
        sa=None if sa and family.supports_sa else "off",
        overrides={**overrides, **(extra or {})},
    )


def learning_plan(
    family: Any, variant: str, budget: Budget, extra: Mapping[str, Any] | None = None, sa: bool = False
) -> Any:
    """The training plan of ``family`` x ``variant`` at ``budget`` (SKF: the demo SKB's cached priors)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return smoke_plan(family, budget, skb=DEMO_SKB if variant == "skf" else None, sa=sa, extra=extra)


def train_and_score(
    family: Any,
    variant: str,
    version_ref: str,
    budget: Budget,
    *,
    extra: Mapping[str, Any] | None = None,
    sa: bool = False,
    log: Callable[[str], None] = print,
) -> LearningResult:
    """Train one model through the real job, evaluate it on the test split, read its curve back."""
    from components.evaluation.job import run_evaluation
    from components.tracking import mlflow_client
    from components.training.job import run_training

    training_plan = learning_plan(family, variant, budget, extra, sa)
    outcome = run_training(version_ref, training_plan, log=log)
    result = run_evaluation(outcome.run_id, version_ref, metrics=("psnr", "ssim"), device="cpu", log=log)
    split = "test"
    return LearningResult(
        family=family.name,
        variant=variant,
        run_id=outcome.run_id,
        seconds=run_seconds(mlflow_client(), outcome.run_id),
        val_input_psnr=_input_psnr(version_ref, training_plan),
        val_curve=val_curve(mlflow_client(), outcome.run_id),
        test={m: result["metrics"].get(f"{split}/{m}") for m in ("psnr", "ssim")},
        references=result["references"],
        headline=result["headline"],
    )


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def results_markdown(results: Sequence[LearningResult], budget: Budget, command: str, machine: str) -> str:
    """The learning table (one row per model), the reference rows and how to reproduce it."""
    from components.evaluation.references import best_classic

    lines = [
        f"Budget: {budget.steps} steps, batch {budget.batch_size}, crop {budget.crop}, Adam lr {budget.lr:g} "
        f"(x0.2 at {int(budget.steps * budget.decay_at)}), each family's smallest network "
        f"(`smoke_model`), SKF with the demo SKB's cached priors (random W48-lite, SA off). {machine}.",
        "",
        "    " + command,
        "",
        "| family | variant | train time | val PSNR: input -> curve (every val step) | test PSNR | test SSIM |",
        "|---|---|---:|---|---:|---:|",
    ]
    for r in results:
        curve = " ".join(f"{p:.1f}" for _, p, _ in r.val_curve)
        lines.append(
            f"| {r.family} | {r.variant} | {r.seconds:.0f} s | {r.val_input_psnr:.1f} -> {curve} | "
            f"{fmt(r.test.get('psnr'), 2)} | {fmt(r.test.get('ssim'), 3)} |"
        )
    if results:
        refs = results[0].references
        lines += ["", "Classic references on the same test split (no training):", ""]
        lines += ["| reference | test PSNR | test SSIM |", "|---|---:|---:|"]
        lines += [f"| {n} | {fmt(s.get('psnr'), 2)} | {fmt(s.get('ssim'), 3)} |" for n, s in refs.items()]
        best, value = best_classic(refs, "psnr")
        lines += ["", f"Best classic by PSNR: {best} ({value:.2f} dB)."]
    return "\n".join(lines) + "\n"


def fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_section(markdown: str, name: str, title: str, path: Path = RESULTS) -> None:
    """Replace the text between the ``<!-- name:start/end -->`` markers of ``path``; the first time, append
    a section headed ``title`` with them. Text outside the markers (the findings) is kept."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{start}\n{markdown}{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n" + block + "\n"
    path.write_text(text)


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """``--steps``, ``--batch-size``, ``--crop``, ``--lr``, ``--val-every`` (defaults: :class:`Budget`)."""
    parser.add_argument("--steps", type=int, default=Budget.steps)
    parser.add_argument("--batch-size", type=int, default=Budget.batch_size)
    parser.add_argument("--crop", type=int, default=Budget.crop)
    parser.add_argument("--lr", type=float, default=Budget.lr)
    parser.add_argument("--val-every", type=int, default=Budget.val_every)


def use_home(home: str, threads: int) -> None:
    """Torch threads, ``SKF_HOME`` and the skf CLI's offline defaults (MLflow's store under it)."""
    import torch

    torch.set_num_threads(threads)
    os.environ["SKF_HOME"] = str(Path(home).expanduser().resolve())
    from flows.env import configure_environment

    configure_environment()


def machine_line() -> str:
    import platform

    import torch

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="", help="comma-separated family names (default: every one)")
    parser.add_argument("--variants", default="plain,skf", help="plain, skf or both")
    add_budget_arguments(parser)
    parser.add_argument("--pairs-per-photo", type=int, default=6, help="demo crops per source photo")
    parser.add_argument("--sa", action="store_true", help="keep SA on for families that define it")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="recipe override KEY=VALUE (JSON value)",
    )
    parser.add_argument(
        "--home",
        default=str(ROOT / ".skf-learning"),
        help="SKF_HOME of the runs (default: .skf-learning; its MLflow store keeps one run per model, and a "
        "rerun of an unchanged configuration reuses its run)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--write-results", action="store_true", help=f"update {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args(argv)

    use_home(args.home, args.threads)
    from components.baselines import families, get_family

    chosen = [get_family(n) for n in args.families.split(",") if n] or list(families())
    budget = Budget.from_args(args)
    extra = parse_overrides(args.set)
    variants = [v for v in args.variants.split(",") if v]
    version_ref = prepare_data(args.pairs_per_photo, skb=DEMO_SKB if "skf" in variants else None)
    results = []
    for family in chosen:
        for variant in variants:
            print(f"== {family.name} / {variant}", flush=True)
            r = train_and_score(family, variant, version_ref, budget, extra=extra, sa=args.sa, log=_quiet)
            print(
                f"   {r.seconds:.0f} s; val {r.val_input_psnr:.2f} -> {r.final_val_psnr:.2f} dB; {r.headline}"
            )
            results.append(r)
    command = "python benchmarks/learning.py " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown = results_markdown(results, budget, command.strip(), machine_line())
    print(markdown)
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    if args.write_results:
        write_section(markdown, "learning", "Learning evidence (`benchmarks/learning.py`)")
    return 0


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as recipe overrides; values are read as JSON where they parse (so ``1e-6``
    is a number, which YAML 1.1 would read as a string) and kept as text otherwise."""
    return {key: _json_or_text(value) for key, value in (item.split("=", 1) for item in items)}


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _quiet(message: str) -> None:
    if "skipped" in message or "error" in message.lower():
        print("   " + message, flush=True)


if __name__ == "__main__":
    sys.exit(main())
