"""Does SKF help when semantics matter? The ablation on generated labelled scenes, offline.

The scenes (:mod:`components.data.scenes`) darken and tint each class differently, so a class-blind global
mapping cannot invert them: an enhancer that knows which class a pixel belongs to should do better. Each
baseline (DRBN and SNR-Net at their smallest sizes, ``family.smoke_model``) trains on the same scenes for
the same budget as:

* ``plain``: no SKF module;
* ``random``: SE + SCH with the random W48-lite SKB (what the offline demo has: priors without semantics);
* ``trained``: SE + SCH with the segmenter trained on the scenes' labels (``--train-segmenter STEPS`` trains
  it here, ``--trained-skb URI`` takes one from ``skf train-skb``); ``trained, F-sup``: the same segmenter
  trained with per-scale class losses on F0-F2, the features SE reads (``feature_supervision``);
* ``oracle``: SE + SCH with ``skb/oracle-labels@1`` (priors made from the ground-truth label maps);
* the modules with the oracle: ``oracle SE``, ``oracle SCH``, and for DRBN ``oracle SE+SCH+SA``.

Every model goes through the real jobs (ingest with label maps, cached priors, ``run_training``,
``run_evaluation``); the report adds the per-class colour error (mean CIEDE2000 ΔE per class, test split)
beside PSNR/SSIM, for the models and for the classic references.

    python benchmarks/semantic_ablation.py --train-segmenter 300 --write-results
    python benchmarks/semantic_ablation.py --families snr-net --steps 800 --trained-skb models:/skf-scene-segmenter@challenger
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from learning import (  # noqa: E402
    Budget,
    add_budget_arguments,
    fmt,
    machine_line,
    parse_overrides,
    run_seconds,
    smoke_plan,
    use_home,
    val_curve,
    write_section,
)

RANDOM_SKB = "skb/hrnet-w48-lite@1"
ORACLE_SKB = "skb/oracle-labels@1"
TRAINED_SKB = "skb/scene-segmenter@1"


@dataclasses.dataclass(frozen=True)
class Arm:
    """One row of the ablation: which SKB and which SKF modules."""

    name: str
    skb: str | None  # None: plain baseline
    se: bool = True
    sch: bool = True
    sa: bool = False
    checkpoint: str | None = None


def arms(family: Any, trained: Mapping[str, str]) -> list[Arm]:
    """The ablation rows for ``family`` (SA only where the family defines it); ``trained``: row name ->
    segmenter checkpoint for the learned-SKB rows."""
    rows = [Arm("plain", None), Arm("random", RANDOM_SKB)]
    rows += [Arm(name, TRAINED_SKB, checkpoint=checkpoint) for name, checkpoint in trained.items()]
    rows += [
        Arm("oracle", ORACLE_SKB),
        Arm("oracle SE", ORACLE_SKB, sch=False),
        Arm("oracle SCH", ORACLE_SKB, se=False),
    ]
    if family.supports_sa:
        rows.append(Arm("oracle SE+SCH+SA", ORACLE_SKB, sa=True))
    return rows


@dataclasses.dataclass
class ArmResult:
    family: str
    arm: str
    run_id: str
    seconds: float
    val_curve: list[tuple[int, float, float | None]]
    test: dict[str, float | None]
    delta_e: dict[str, float]  # class name -> mean CIEDE2000 on the test split


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def prepare_scenes(train: int, test: int, seed: int = 0, name: str = "scenes") -> str:
    """Generate and ingest the labelled scenes under ``$SKF_HOME``; returns the dataset version ref."""
    from components.data.ingest import ingest
    from components.data.scenes import generate_scene_dataset
    from components.settings import get_settings

    root = get_settings().home / f"{name}-data"
    if not (root / "our485").is_dir():
        generate_scene_dataset(root, seed=seed, train=train, test=test, overwrite=True)
    return ingest(str(root), name=name, layout="lol").ref


# --------------------------------------------------------------------------------------------------
# Per-class colour error
# --------------------------------------------------------------------------------------------------
def class_delta_e(
    outputs: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    classes: int,
) -> np.ndarray:
    """Mean CIEDE2000 ΔE per class over all test pixels (H×W×3 float images in [0, 1]); NaN where absent."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    total, count = np.zeros(classes), np.zeros(classes)
    for out, ref, lab in zip(outputs, references, labels, strict=True):
        de = deltaE_ciede2000(rgb2lab(ref), rgb2lab(np.clip(out, 0, 1)))
        total += np.bincount(lab.ravel(), weights=de.ravel(), minlength=classes)[:classes]
        count += np.bincount(lab.ravel(), minlength=classes)[:classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def _test_set(
    version_ref: str,
) -> tuple[list[Any], list[np.ndarray], list[np.ndarray], list[np.ndarray], list[str]]:
    """Test pairs of the labelled version: records, low and high as float HWC, label maps, class names."""
    from components.data.ingest import get_version
    from components.data.torch_dataset import load_label, load_rgb

    version = get_version(version_ref)
    pairs = version.pairs("test")
    lows = [load_rgb(low).astype(np.float64) / 255 for low, _ in pairs]
    highs = [load_rgb(high).astype(np.float64) / 255 for _, high in pairs]
    labels = [load_label(version.label_of(low)) for low, _ in pairs]
    return [low for low, _ in pairs], lows, highs, labels, list(version.label_classes)


def model_outputs(run_id: str, lows: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The trained model's outputs on the test inputs (labels go to a label-fed SKB, ignored otherwise)."""
    import torch

    from components.evaluation.job import load_model, resolve_model
    from components.tracking import mlflow_client

    enhancer = load_model(resolve_model(mlflow_client(), run_id), torch.device("cpu"))
    outs = []
    with torch.inference_mode():
        for low, lab in zip(lows, labels, strict=True):
            x = torch.from_numpy(low).float().permute(2, 0, 1)[None]
            extra = {"labels": torch.from_numpy(lab).long()[None]} if enhancer.needs_labels else {}
            outs.append(enhancer(x, **extra)[0].permute(1, 2, 0).double().numpy())
    return outs


# --------------------------------------------------------------------------------------------------
# One arm
# --------------------------------------------------------------------------------------------------
def arm_plan(family: Any, arm: Arm, budget: Budget, extra: Mapping[str, Any] | None = None) -> Any:
    """The training plan of one arm: the family's smallest network, cached priors of the low-light input."""
    return smoke_plan(
        family, budget, skb=arm.skb, checkpoint=arm.checkpoint, se=arm.se, sch=arm.sch, sa=arm.sa, extra=extra
    )


def run_arm(
    family: Any,
    arm: Arm,
    version_ref: str,
    budget: Budget,
    test_set: tuple[Any, ...],
    *,
    extra: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> ArmResult:
    from components.evaluation.job import run_evaluation
    from components.tracking import mlflow_client
    from components.training.job import run_training

    training_plan = arm_plan(family, arm, budget, extra)
    outcome = run_training(version_ref, training_plan, log=log)
    result = run_evaluation(outcome.run_id, version_ref, metrics=("psnr", "ssim"), device="cpu", log=log)
    _, lows, highs, labels, names = test_set
    de = class_delta_e(model_outputs(outcome.run_id, lows, labels), highs, labels, len(names))
    return ArmResult(
        family=family.name,
        arm=arm.name,
        run_id=outcome.run_id,
        seconds=run_seconds(mlflow_client(), outcome.run_id),
        val_curve=val_curve(mlflow_client(), outcome.run_id),
        test={m: result["metrics"].get(f"test/{m}") for m in ("psnr", "ssim")},
        delta_e={n: float(v) for n, v in zip(names, de, strict=True)},
    )


def reference_rows(test_set: tuple[Any, ...]) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    """(name, {psnr, ssim}, per-class ΔE) of each classic reference on the scenes' test split."""
    import torch

    from components.evaluation import evaluate_pairs
    from components.evaluation.references import enhance_references

    _, lows, highs, labels, names = test_set
    tensors = [torch.from_numpy(x).float().permute(2, 0, 1) for x in lows]
    refs = [torch.from_numpy(x).float().permute(2, 0, 1) for x in highs]
    rows = []
    for name, outs in enhance_references(tensors).items():
        scores = evaluate_pairs(outs, refs, "raw", ("psnr", "ssim")).aggregates
        arrays = [o.permute(1, 2, 0).double().numpy() for o in outs]
        de = class_delta_e(arrays, highs, labels, len(names))
        rows.append((name, scores, {n: float(v) for n, v in zip(names, de, strict=True)}))
    return rows


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def ablation_markdown(
    results: Sequence[ArmResult],
    references: Sequence[tuple[str, Mapping[str, float], Mapping[str, float]]],
    budget: Budget,
    scenes: tuple[int, int],
    command: str,
) -> str:
    names = list(results[0].delta_e) if results else list(references[0][2]) if references else []
    head = "| family | model | train time | test PSNR | test SSIM | " + " | ".join(f"ΔE {n}" for n in names)
    head += " | ΔE mean |"
    rule = "|---|---|---:|---:|---:|" + "---:|" * (len(names) + 1)
    lines = [
        f"{scenes[0]} train / {scenes[1]} test scenes (128x192), budget {budget.steps} steps, batch "
        f"{budget.batch_size}, crop {budget.crop}, Adam lr {budget.lr:g}; each family's smallest network, "
        f"cached priors of the low-light input. {machine_line()}.",
        "",
        "    " + command,
        "",
        head,
        rule,
    ]
    for r in results:
        de = [r.delta_e[n] for n in names]
        lines.append(
            f"| {r.family} | {r.arm} | {r.seconds:.0f} s | {fmt(r.test.get('psnr'), 2)} | "
            f"{fmt(r.test.get('ssim'), 3)} | "
            + " | ".join(f"{v:.1f}" for v in de)
            + f" | {np.nanmean(de):.1f} |"
        )
    for name, scores, de_map in references:
        de = [de_map[n] for n in names]
        lines.append(
            f"| reference | {name} | - | {fmt(scores.get('psnr'), 2)} | {fmt(scores.get('ssim'), 3)} | "
            + " | ".join(f"{v:.1f}" for v in de)
            + f" | {np.nanmean(de):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="snr-net,drbn")
    parser.add_argument("--arms", default="", help="comma-separated arm names (default: all)")
    add_budget_arguments(parser)
    parser.add_argument("--train-scenes", type=int, default=32)
    parser.add_argument("--test-scenes", type=int, default=8)
    parser.add_argument(
        "--trained-skb", help="models:/... URI (or path) of the segmenter from `skf train-skb`"
    )
    parser.add_argument(
        "--train-segmenter",
        type=int,
        metavar="STEPS",
        help="train (or reuse) the scene segmenter on the scenes first, for the 'trained' rows",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="recipe override KEY=VALUE (JSON value)",
    )
    parser.add_argument("--home", default=str(ROOT / ".skf-learning"), help="SKF_HOME of the runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args(argv)

    use_home(args.home, args.threads)
    from components.baselines import get_family
    from components.precompute import precompute_priors

    budget = Budget.from_args(args)
    extra = parse_overrides(args.set)
    version_ref = prepare_scenes(args.train_scenes, args.test_scenes)
    test_set = _test_set(version_ref)
    trained = {"trained": args.trained_skb} if args.trained_skb else {}
    if args.train_segmenter:
        from components.segmenter.job import make_config, run_segmenter_training

        # the segmenter as a segmenter, and one whose F0-F2 (what SE reads) are trained to carry the classes
        for name, settings in (("trained", {}), ("trained, F-sup", {"feature_supervision": 1.0})):
            seg = run_segmenter_training(
                version_ref, make_config(settings, steps=args.train_segmenter), log=lambda _m: None
            )
            trained[name] = seg.checkpoint
            print(
                f"segmenter {name} {seg.status}: {seg.checkpoint}, test mIoU {seg.metrics.get('test/miou'):.3f}"
            )
    wanted = {a for a in args.arms.split(",") if a}
    results = []
    for family in (get_family(n) for n in args.families.split(",") if n):
        for arm in arms(family, trained):
            if wanted and arm.name not in wanted:
                continue
            if arm.skb is not None:
                precompute_priors(version_ref, arm.skb, checkpoint=arm.checkpoint, splits=("train", "test"))
            print(f"== {family.name} / {arm.name}", flush=True)
            r = run_arm(family, arm, version_ref, budget, test_set, extra=extra, log=lambda _m: None)
            mean_de = np.nanmean(list(r.delta_e.values()))
            print(f"   {r.seconds:.0f} s; test {r.test}; mean ΔE {mean_de:.2f}; {r.delta_e}", flush=True)
            results.append(r)
    references = reference_rows(test_set)
    command = "python benchmarks/semantic_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown = ablation_markdown(
        results, references, budget, (args.train_scenes, args.test_scenes), command.strip()
    )
    print(markdown)
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    if args.write_results:
        write_section(markdown, "semantic", "Semantic ablation (`benchmarks/semantic_ablation.py`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
