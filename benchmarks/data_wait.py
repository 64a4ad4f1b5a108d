"""Benchmark: how much of a training step waits for data, with the recipe's input pipeline.

Builds a throw-away SKF home, ingests ``--images`` synthetic low-light pairs of ``--height`` x
``--width`` (default 400x600, the LOL size), and runs the training job itself
(:func:`components.training.job.run_training`: cached priors precomputed first, then the recipe's
dataset, crops, batch and DataLoader settings, fp16 priors through pinned memory) for ``--steps`` steps.
The engine logs ``perf/data_wait_share`` (time blocked on the next batch / step time) and ``perf/step_s``
with every step's metrics; the first ``--warmup`` steps (DataLoader start, cuDNN autotuning) are reported
apart, the rest pooled (total wait / total step time). Each epoch restarts the loader's workers, so the
pooled figure includes those restarts.

    python benchmarks/data_wait.py --recipe snr-net-skf --device cuda --steps 60
    python benchmarks/data_wait.py --recipe snr-net-skf --device cpu --steps 4 --warmup 1 --images 4 \
        --height 64 --width 96 --crop 32 --batch 2         # the smoke run of the test suite

Without ``--checkpoint`` the SKB is randomly initialised: the input pipeline's cost is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.precompute import write_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="snr-net-skf")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5, help="first steps reported apart")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--height", type=int, default=400)
    parser.add_argument("--width", type=int, default=600)
    parser.add_argument("--batch", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--crop", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--num-workers", type=int, default=None, help="default: the job's auto rule")
    parser.add_argument("--checkpoint", default=None, help="SKB checkpoint (default: random init)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.steps <= args.warmup:
        sys.exit("--steps must be more than --warmup")

    home = Path(tempfile.mkdtemp(prefix="skf-bench-data-wait-"))
    os.environ.update(
        {
            "SKF_HOME": str(home),
            "MLFLOW_TRACKING_URI": (home / "mlruns").as_uri(),
            "MLFLOW_ALLOW_FILE_STORE": "true",
        }
    )
    for var in ("SKF_CATALOG_URL", "SKF_STORAGE_URI"):
        os.environ.pop(var, None)

    from mlflow import MlflowClient

    from components.data.ingest import ingest
    from components.training.engine import data_workers, select_device
    from components.training.job import run_training
    from components.training.plan import TrainingRequest, plan

    overrides: dict[str, object] = {
        "train.iterations": args.steps,
        "train.val_every": args.steps,
        "train.ckpt_every": args.steps,
        # a schedule that fits the short run; the learning rate does not change what the loader does
        "scheduler": {"name": "multistep", "milestones": [args.steps - 1], "step_size": None, "warmup": 0},
    }
    if args.batch:
        overrides["train.batch_size"] = args.batch
    if args.crop:
        overrides["train.crop"] = args.crop
    request = TrainingRequest(
        recipe=args.recipe,
        overrides=overrides,
        device=args.device,
        val_fraction=0.0,
        skb_checkpoint=args.checkpoint,
        num_workers=args.num_workers,
    )
    training_plan = plan(request)
    ref = ingest(str(write_dataset(home / "src", args.images, args.height, args.width)), name="bench").ref
    outcome = run_training(ref, training_plan, log=lambda _m: None)
    client = MlflowClient((home / "mlruns").as_uri())
    share = dict((m.step, m.value) for m in client.get_metric_history(outcome.run_id, "perf/data_wait_share"))
    step_s = dict((m.step, m.value) for m in client.get_metric_history(outcome.run_id, "perf/step_s"))
    if sorted(share) != list(range(1, args.steps + 1)):
        sys.exit(f"FAIL: expected perf/data_wait_share at every step, got steps {sorted(share)}")

    def pooled(steps: list[int]) -> float:  # total wait / total step time
        return sum(share[s] * step_s[s] for s in steps) / sum(step_s[s] for s in steps)

    warm, steady = list(range(1, args.warmup + 1)), list(range(args.warmup + 1, args.steps + 1))
    results = {
        "recipe": args.recipe,
        "device": str(select_device(args.device)),
        "image_size": [args.height, args.width],
        "batch_size": training_plan.recipe.train.batch_size,
        "crop": training_plan.recipe.train.crop,
        "num_workers": data_workers(args.num_workers, select_device(args.device)),
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "warmup_data_wait_share": round(pooled(warm), 4) if warm else None,
        "data_wait_share": round(pooled(steady), 4),
        "data_wait_share_worst_step": round(max(share[s] for s in steady), 4),
        "step_s_mean": round(statistics.fmean(step_s[s] for s in steady), 5),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
