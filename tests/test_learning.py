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
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

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


# The Retinex families train their decomposition first and the image-producing sub-network after it; at
# this budget (a few dozen decomposition steps of an 8-channel network) the decomposition has barely left
# its initial output, and the output stays 2-4 dB above the input, not 3 dB on the test split (measured
# 2026-12-07, benchmarks/RESULTS.md). Known, not hidden: strict, so the mark must go once they clear it.
SLOW_LEARNERS = {"retinexnet", "kind", "kind-pp"}


def _family_cases() -> list[Any]:
    marks = pytest.mark.xfail(
        strict=True, reason="staged Retinex family: does not clear the margin at this CPU budget (see above)"
    )
    return [pytest.param(f.name, marks=marks) if f.name in SLOW_LEARNERS else f.name for f in families()]


@pytest.mark.slow
@pytest.mark.parametrize("variant", learning.VARIANTS)
@pytest.mark.parametrize("family", _family_cases())
def test_every_family_learns(family: str, variant: str, learning_data: dict[str, str]) -> None:
    from components.baselines import get_family

    fam = get_family(family)
    result = learning.train_and_score(fam, variant, learning_data["version_ref"], BUDGET, log=lambda _m: None)
    print(
        f"{family}/{variant}: val {result.val_input_psnr:.2f} -> {result.val_curve} in {result.seconds:.0f} s"
    )
    steps = [step for step, _, _ in result.val_curve]
    if fam.stages:  # validated in its final stage (the earlier ones validate their decomposition)
        assert steps and all(0 < s <= BUDGET.steps for s in steps)
    else:
        assert steps == [50, 100, 150]
    assert result.margin_db > MARGIN_DB, (
        f"{family}/{variant}: validation PSNR {result.final_val_psnr:.2f} dB is not {MARGIN_DB} dB above "
        f"the input's {result.val_input_psnr:.2f} dB (curve {result.val_curve})"
    )
    # the evaluation carried the reference rows the report compares against
    assert set(result.references) == {"input", "gamma", "clahe", "hist-eq"}
    assert result.test["psnr"] > result.references["input"]["psnr"] + MARGIN_DB
