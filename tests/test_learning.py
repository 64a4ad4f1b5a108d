"""Every registered baseline family learns: a short run of ``benchmarks/learning.py`` beats the input.

A family can build, step and register yet not learn (a sign error in a loss, an output that ignores the
input, priors that swamp the features). This sweep trains each registered family's smallest network, plain
and with SKF on cached priors, for a few steps on the demo pairs through the real training and evaluation
jobs, and asserts that its final validation PSNR is above the low-light input's by ``MARGIN_DB``.

Why 3 dB: measured on 2026-12-07 (2 CPU threads) with this budget, the four models gained 4.8 to 8.9 dB over
their validation inputs (DRBN plain +4.9, DRBN-SKF +4.8, SNR-Net +8.9, SNR-Net-SKF +8.2; 4 to 22 s each),
and the DRBN models that did not learn (before the sign anchor of docs/method.md §6.1) gained 0.7 dB and
lost 1.2 dB. 3 dB sits between: room for seed and platform noise, none for a family that does not learn.
The data differ from the demo's (4 crops per photo), so the validation inputs are 7.9 to 10.5 dB.

The staged Retinex families (RetinexNet, KinD, KinD++) train their decomposition (and KinD's adjustment)
before the image network, which trains the budget's steps; their smoke recipes raise the rates the released
ones use over ~100,000 steps (``family.smoke_stage_steps``, ``smoke_recipe``; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import learning  # noqa: E402

from components.baselines import families  # noqa: E402

MARGIN_DB = 3.0
BUDGET = learning.Budget(steps=150, batch_size=4, crop=64, lr=5e-4, val_every=50)


@pytest.fixture(scope="module")
def learning_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One SKF_HOME for the module: demo pairs ingested, demo-SKB priors cached once."""
    home = tmp_path_factory.mktemp("learning-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("SKF_HOME", str(home))
    for var in ("SKF_CATALOG_URL", "SKF_STORAGE_URI", "SKF_WEIGHTS_URI"):
        patch.delenv(var, raising=False)
    patch.setenv("MLFLOW_TRACKING_URI", (home / "mlruns").as_uri())
    try:
        yield {"version_ref": learning.prepare_data(pairs_per_photo=4)}
    finally:
        patch.undo()


FAMILIES = [f.name for f in families()]


@pytest.mark.slow
@pytest.mark.parametrize("variant", learning.VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_learns(family: str, variant: str, learning_data: dict[str, str]) -> None:
    from components.baselines import get_family

    fam = get_family(family)
    result = learning.train_and_score(fam, variant, learning_data["version_ref"], BUDGET, log=lambda _m: None)
    print(
        f"{family}/{variant}: val {result.val_input_psnr:.2f} -> {result.val_curve} in {result.seconds:.0f} s"
    )
    steps = [step for step, _, _ in result.val_curve]
    # a staged family is validated in its final stage (the earlier ones validate their decomposition),
    # which trains the budget's steps after them
    before = fam.smoke_steps(BUDGET.steps)["train.iterations"] - BUDGET.steps
    assert steps == [before + 50, before + 100, before + 150]
    assert result.margin_db > MARGIN_DB, (
        f"{family}/{variant}: validation PSNR {result.final_val_psnr:.2f} dB is not {MARGIN_DB} dB above "
        f"the input's {result.val_input_psnr:.2f} dB (curve {result.val_curve})"
    )
    # the evaluation carried the reference rows the report compares against
    assert set(result.references) == {"input", "gamma", "clahe", "hist-eq"}
    assert result.test["psnr"] > result.references["input"]["psnr"] + MARGIN_DB


@pytest.mark.parametrize("family", FAMILIES)
def test_the_image_network_trains_the_budgets_steps(family: str) -> None:
    """The learning plan gives every family's image network ``steps``; a staged family's earlier stages
    train before it, in addition, at their smoke rates (planned only: nothing trains here)."""
    from components.baselines import get_family

    fam = get_family(family)
    budget = learning.Budget(steps=90)
    recipe = learning.learning_plan(fam, "plain", budget).recipe
    if not fam.stages:
        assert recipe.train.iterations == 90 and not recipe.stages
        return
    stages = {s.name: s.iterations for s in recipe.stages}
    assert stages == {name: round(90 * share) for name, share in fam.smoke_stage_steps.items()}
    assert stages[fam.stages[-1].name] == 90 and recipe.train.iterations == sum(stages.values())
    for stage in recipe.stages:  # the smoke rates reached the plan
        key = f"stages.{stage.name}.optimizer"
        if key in fam.smoke_recipe:
            assert stage.optimizer is not None and stage.optimizer.lr == fam.smoke_recipe[key]["lr"]


def test_smoke_stage_steps_must_cover_every_stage_and_give_the_final_one_the_budget() -> None:
    from components.baselines import get_family

    kind = type(get_family("kind"))
    for bad in ({"decom": 1.0, "restore": 1.0}, {"decom": 1.0, "adjust": 0.5, "restore": 0.5}):
        broken = type("Broken", (kind,), {"smoke_stage_steps": bad})()
        with pytest.raises(TypeError, match="smoke_stage_steps must give every stage"):
            broken.smoke_steps(100)
