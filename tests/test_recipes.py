"""Typed training recipes: shipped defaults (docs/method.md §7), inheritance, overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.recipes import Recipe, RecipeError, available_recipes, load_recipe


def test_all_shipped_recipes_validate() -> None:
    names = available_recipes()
    assert {"drbn", "drbn-skf", "snr-net", "snr-net-skf"} <= set(names)
    for name in names:
        assert isinstance(load_recipe(name), Recipe)


def test_drbn_recipes_carry_the_official_defaults() -> None:
    plain, skf = load_recipe("drbn"), load_recipe("drbn-skf")
    for r in (plain, skf):
        assert r.baseline == "baseline/drbn@1"
        assert (r.optimizer.name, r.optimizer.lr, r.optimizer.betas, r.optimizer.eps) == (
            "adam",
            1e-4,
            (0.9, 0.999),
            1e-8,
        )
        assert (r.scheduler.name, r.scheduler.step_size, r.scheduler.gamma) == ("step", 72_800, 0.5)
        assert (r.train.batch_size, r.train.crop, r.train.seed, r.train.precision) == (4, 256, 1, "fp32")
        assert r.train.iterations == 109_200 and r.train.augment.transpose
        assert set(r.losses) == {"ssim-pyramid"}
    assert not plain.skf.enabled and plain.builder_kwargs() == {"skf": False}
    assert skf.skf.se and skf.skf.sch.enabled and skf.skf.sa.enabled
    assert (skf.skf.sch.weight, skf.skf.sch.normalizer, skf.skf.sch.every) == (1.0, "nchw3", 1)
    assert (skf.skf.sa.weight, skf.skf.sa.lam, skf.skf.sa.d_lr_ratio) == (0.1, 0.9, 1e-3)
    assert (skf.skf.skb_mode, skf.skf.skb_input) == ("online", "intermediate")
    assert skf.builder_kwargs() == {"skf": True}


def test_snr_recipes_carry_the_official_defaults() -> None:
    plain, skf = load_recipe("snr-net"), load_recipe("snr-net-skf")
    for r in (plain, skf):
        assert r.baseline == "baseline/snr-net@1"
        assert (r.optimizer.lr, r.optimizer.betas, r.optimizer.weight_decay) == (1e-4, (0.9, 0.99), 0.0)
        assert r.scheduler.milestones == [50_000, 100_000, 200_000, 300_000] and r.scheduler.gamma == 0.5
        assert (r.train.iterations, r.train.batch_size, r.train.crop, r.train.seed) == (
            600_000,
            16,
            128,
            3407,
        )
        assert r.losses["charbonnier"].params == {"eps": 1e-6, "reduction": "sum"}
        assert not r.train.augment.transpose
    assert (skf.skf.sch.weight, skf.skf.sch.every, skf.skf.sch.normalizer) == (1e4, 50, "nhw")
    assert not skf.skf.sa.enabled and skf.skf.se and skf.skf.two_pass_test
    assert (skf.skf.skb_mode, skf.skf.skb_input) == ("cached", "lq")


def test_overrides_accept_nested_and_dotted_keys() -> None:
    r = load_recipe(
        "snr-net-skf",
        {"train.iterations": 500, "scheduler": {"milestones": [100, 200]}, "skf.skb_input": "gt"},
    )
    assert r.train.iterations == 500 and r.train.batch_size == 16
    assert r.scheduler.milestones == [100, 200]
    assert r.skf.skb_input == "gt" and r.skf.sch.weight == 1e4


def test_build_model_goes_through_the_registry() -> None:
    model = load_recipe("drbn", {"model": {"g0": 8}}).build_model()
    assert model.recur1.SFENet1.out_channels == 8 and not model.skf


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"train.itrations": 5}, "train.itrations: unknown key"),
        ({"foo": 1}, "foo: unknown key"),
        ({"optimizer.lr": -1}, "optimizer.lr"),
        ({"optimizer.betas": [0.9, 1.5]}, "betas must lie in [0, 1)"),
        ({"optimizer.name": "sgd"}, "optimizer.name"),
        ({"scheduler": {"milestones": None}}, "needs milestones"),
        ({"scheduler.step_size": 10}, "step_size only applies"),
        ({"scheduler.milestones": [300, 100]}, "increasing"),
        ({"train.iterations": 1000}, "last milestone (300000)"),
        ({"losses": {"l1": {}}}, "unknown loss(es) ['l1']"),
        ({"skf.skb_input": "intermediate"}, "needs skb_mode 'online'"),
        ({"train.precision": "fp8"}, "train.precision"),
        ({"model": {"skf": True}}, "skf.se"),
    ],
)
def test_invalid_recipes_fail_with_clear_errors(overrides: dict, fragment: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe("snr-net", overrides)
    message = str(err.value)
    assert "snr-net.yaml" in message and fragment in message


def test_unknown_recipe_lists_what_exists() -> None:
    with pytest.raises(RecipeError, match="unknown recipe 'drbm'.*drbn-skf"):
        load_recipe("drbm")


def test_recipe_files_extend_and_detect_cycles(tmp_path: Path) -> None:
    base = yaml.safe_load((Path(__file__).parent.parent / "configs/recipes/drbn.yaml").read_text())
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "child.yaml").write_text("extends: base\nname: child\ntrain: {seed: 9}\n")
    child = load_recipe(tmp_path / "child.yaml")
    assert (child.name, child.train.seed, child.train.batch_size) == ("child", 9, 4)

    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: missing\n")
    with pytest.raises(RecipeError, match="missing.yaml does not exist"):
        load_recipe(tmp_path / "orphan.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
