"""The semantic ablation's measurements: per-class colour error and the rows it trains."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import semantic_ablation  # noqa: E402

from components.baselines import get_family  # noqa: E402


def test_class_delta_e_is_zero_where_colours_match_and_counts_per_class() -> None:
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.2, 0.8, size=(16, 24, 3))
    labels = np.zeros((16, 24), dtype=np.uint8)
    labels[:, 12:] = 2  # class 1 absent
    out = ref.copy()
    out[:, 12:, 0] = np.clip(out[:, 12:, 0] + 0.2, 0, 1)  # a red cast on class 2 only
    de = semantic_ablation.class_delta_e([out], [ref], [labels], classes=3)
    assert de[0] < 1e-6 and np.isnan(de[1]) and de[2] > 3.0
    doubled = semantic_ablation.class_delta_e([out, ref], [ref, ref], [labels, labels], classes=3)
    np.testing.assert_allclose(doubled[2], de[2] / 2)  # pixel-weighted over images


def test_every_family_gets_the_documented_rows() -> None:
    snr = semantic_ablation.arms(get_family("baseline/snr-net@1"), {"trained": "models:/x/1"})
    assert [a.name for a in snr] == ["plain", "random", "trained", "oracle", "oracle SE", "oracle SCH"]
    assert snr[0].skb is None and snr[2].checkpoint == "models:/x/1" and not snr[4].sch and not snr[5].se
    drbn = semantic_ablation.arms(get_family("baseline/drbn@1"), {})
    assert drbn[-1].name == "oracle SE+SCH+SA" and drbn[-1].sa  # SA only where the family defines it
