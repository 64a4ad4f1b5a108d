"""An SKF model on oracle priors trains, validates and evaluates end to end, with the scenes' label maps.

The oracle SKB makes its priors from ground-truth label maps, so every place that runs an SKB outside the
prior cache (validation inside training, the SNR two-pass test flow, evaluation) must hand it the pair's
label map, and a use without one (an unlabelled image) must fail with a clear error, never run on zeros.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.data.ingest import ingest
from components.data.scenes import generate_scene_dataset
from components.evaluation.job import load_model, resolve_model, run_evaluation
from components.inference import EnhancerSpecError
from components.tracking import mlflow_client
from components.training.job import run_training
from components.training.plan import plan

SMALL = {"model.nf": 16, "model.light_blocks": 1, "model.n_layers": 1, "model.heads": 2, "model.d_inner": 32}
RUN = {
    "train.iterations": 4,
    "train.batch_size": 2,
    "train.crop": 64,
    "train.val_every": 2,
    "train.ckpt_every": 4,
    "scheduler.milestones": [3],
}


@pytest.mark.slow
def test_snr_skf_on_oracle_priors_trains_validates_and_evaluates(skf_home: Path, tmp_path: Path) -> None:
    root = generate_scene_dataset(tmp_path / "scenes", train=6, test=2, size=(64, 96))
    ref = ingest(str(root), name="scenes", layout="lol").ref
    training_plan = plan(
        baseline="baseline/snr-net@1",
        recipe="snr-net-skf",
        skb="skb/oracle-labels@1",
        skb_mode="cached",
        overrides={**SMALL, **RUN},
        val_fraction=0.2,
    )
    assert training_plan.recipe.skf.two_pass_test  # the output stage re-segments: it gets the labels too
    outcome = run_training(ref, training_plan, log=lambda _m: None)
    client = mlflow_client()
    val = client.get_metric_history(outcome.run_id, "val/psnr")
    assert [m.step for m in val] == [2, 4] and all(m.value > 0 for m in val)

    result = run_evaluation(outcome.run_id, ref, metrics=("psnr", "ssim"), device="cpu", log=lambda _m: None)
    assert result["metrics"]["test/num_images"] == 2.0 and result["metrics"]["test/psnr"] > 0
    assert result["headline"].startswith("PSNR: model ")

    enhancer = load_model(resolve_model(client, outcome.run_id), torch.device("cpu"))
    assert enhancer.needs_labels and not enhancer.pretrained_skb
    x = torch.rand(1, 3, 64, 96)
    with pytest.raises(EnhancerSpecError, match="label maps"):
        enhancer(x)
    labels = torch.zeros(1, 64, 96, dtype=torch.long)
    with torch.no_grad():
        a = enhancer(x, labels=labels)
        b = enhancer(x, labels=labels.fill_(3))
    assert a.shape == x.shape and not torch.equal(a, b)  # the priors (the labels) change the output
