"""Registry sweep (timm's ``test_models`` idea): every registered family, SE variant and SKB is exercised
without anyone writing a test for it. A new family registered in ``components.baselines`` is picked up here.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from components import registry
from components.baselines import BaselineFamily, UnknownFamilyError, families, get_family
from components.errors import UserInputError
from components.inference import Enhancer, load_enhancer_dir, make_spec, save_enhancer
from components.recipes import load_recipe
from components.registry import create
from components.training import InMemoryLogger
from components.training.routines import build_routine, train

SKB = "skb/hrnet-w48-lite@1"  # the SKF feature widths (48/96/192, 59 classes), small and random
FAMILIES = families()
RUN = {
    "train.iterations": 2,
    "train.batch_size": 2,
    "train.crop": 32,
    "train.val_every": 2,
    "train.ckpt_every": 2,
    "skf.skb_mode": "online",
    "scheduler.name": "constant",
    "scheduler.milestones": None,
    "scheduler.step_size": None,
    "scheduler.warmup": 0,
}


class Pairs(Dataset):
    """32×32 low/high pairs where high is a brightened low."""

    def __init__(self, n: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.low = torch.rand(n, 3, 32, 32, generator=g) * 0.3

    def __len__(self) -> int:
        return len(self.low)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"low": self.low[i], "high": (self.low[i] * 3).clamp(0, 1)}


@pytest.fixture(scope="module")
def skb() -> Any:
    torch.manual_seed(0)
    return create(SKB, device="cpu")


def _steps(family: BaselineFamily) -> int:
    """Two steps, or one per stage for multi-stage families."""
    return max(RUN["train.iterations"], len(family.stages))


def _recipe(family: BaselineFamily, skf: bool, **extra: Any) -> Any:
    name = f"{family.name}-skf" if skf else family.name
    overrides: dict[str, Any] = {
        "model": dict(family.smoke_model),
        **RUN,
        "train.iterations": _steps(family),
        **extra,
    }
    recipe = load_recipe(name, overrides)
    if recipe.skf.skb_input == "gt":
        recipe = load_recipe(name, {**overrides, "skf.skb_input": "lq"})
    return recipe


def test_every_registered_baseline_has_a_family() -> None:
    specs = {e.key for e in registry.entries("baseline")}
    assert specs == {f.spec for f in FAMILIES} and len(FAMILIES) >= 2
    for family in FAMILIES:
        assert get_family(family.name) is get_family(family.spec) is family
        assert family.smoke_model and family.se_slots and family.routine is not None
    with pytest.raises(UnknownFamilyError, match="registered: "):
        get_family("baseline/nope@1")


@pytest.mark.parametrize("skf", [False, True], ids=["plain", "skf"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_trains_one_step_and_round_trips(
    family: BaselineFamily, skf: bool, skb: Any, tmp_path: Path
) -> None:
    recipe = _recipe(family, skf)
    logger = InMemoryLogger()
    result = train(
        recipe, Pairs(), DataLoader(Pairs(2), batch_size=2), run_dir=tmp_path / "run", skb=skb if skf else None,
        logger=logger, device="cpu",
    )  # fmt: skip
    assert result.step == _steps(family)
    losses = [v for _, row in logger.metrics for k, v in row.items() if "train/" in k]
    assert losses and all(np.isfinite(losses))
    for stage in recipe.stages:  # multi-stage families: one step per stage, logged under its name
        assert any(k.startswith(f"{stage.name}/train/") for _, row in logger.metrics for k in row)
    assert logger.params["component.baseline"] == family.spec
    if skf:
        assert logger.params["component.se"] == family.default_se

    torch.manual_seed(1)
    net = create(family.spec, skf=skf, **family.smoke_model)
    enhancer = Enhancer(net, skb if skf else None, make_spec(family.spec, net, skb if skf else None,
                        baseline_kwargs=family.smoke_model)).eval()  # fmt: skip
    x = torch.rand(1, 3, 36, 44)  # not a multiple of any stride: the family pads and crops
    with torch.no_grad():
        out = enhancer(x)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    save_enhancer(enhancer, tmp_path / "pkg")
    with torch.no_grad():
        assert torch.equal(load_enhancer_dir(tmp_path / "pkg")(x), out)


@pytest.mark.parametrize("skf", [False, True], ids=["plain", "skf"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_pyfunc_round_trip(family: BaselineFamily, skf: bool, skb: Any, skf_home: Path) -> None:
    from components import model_registry as mr

    torch.manual_seed(2)
    net = create(family.spec, skf=skf, **family.smoke_model)
    spec = make_spec(family.spec, net, skb if skf else None, baseline_kwargs=family.smoke_model)
    enhancer = Enhancer(net, skb if skf else None, spec).eval()
    client = mlflow.MlflowClient()
    experiment = client.create_experiment(f"sweep-{uuid.uuid4().hex[:6]}")
    run_id = client.create_run(experiment).info.run_id
    name = f"sweep-{family.name}-{'skf' if skf else 'plain'}"
    reg = mr.log_enhancer(
        enhancer, run_id=run_id, dataset_version="sweep@1", protocol="raw", metrics={"psnr": 1.0},
        name=name, bundle_code=False,
    )  # fmt: skip
    batch = np.random.default_rng(0).random((1, 40, 48, 3), dtype=np.float32)
    with torch.no_grad():
        expected = enhancer(torch.from_numpy(batch).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    out = mlflow.pyfunc.load_model(f"models:/{name}/{reg.version}").predict(batch)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def _exported_vs_eager(family: BaselineFamily, skf: bool, skb: Any, fmt: str, tmp_path: Path) -> float:
    """Largest difference between the exported enhancer (traced at 36×44) and eager PyTorch."""
    from components.export import example_input, export_enhancer

    torch.manual_seed(3)
    net = create(family.spec, skf=skf, **family.smoke_model)
    enhancer = Enhancer(net, skb if skf else None, make_spec(family.spec, net, skb if skf else None,
                        baseline_kwargs=family.smoke_model)).eval()  # fmt: skip
    x = example_input(36, 44)
    with torch.no_grad():
        expected = enhancer(x).numpy()
    path = export_enhancer(enhancer, tmp_path / f"enhancer.{fmt}", fmt, height=36, width=44)  # type: ignore[arg-type]
    if fmt == "torchscript":
        with torch.no_grad():
            got = torch.jit.load(str(path))(x).numpy()
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(["enhanced"], {"image": x.numpy()})
    return float(np.abs(got - expected).max())


@pytest.mark.parametrize("skf", [False, True], ids=["plain", "skf"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_exports_to_torchscript(family: BaselineFamily, skf: bool, skb: Any, tmp_path: Path) -> None:
    assert _exported_vs_eager(family, skf, skb, "torchscript", tmp_path) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_exports_to_onnx(family: BaselineFamily, skb: Any, tmp_path: Path) -> None:
    assert _exported_vs_eager(family, True, skb, "onnx", tmp_path) < 1e-4


def _se_specs() -> list[str]:
    return sorted(e.key for e in registry.entries("se"))


@pytest.mark.parametrize("se", _se_specs())
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_se_variant_that_fits_builds_and_runs(family: BaselineFamily, se: str, skb: Any) -> None:
    try:
        family.check_se(se, family.smoke_model)
    except UserInputError as exc:  # a variant that cannot fit says why, at planning time
        assert se in str(exc) and family.spec in str(exc)
        return
    torch.manual_seed(0)
    net = create(family.spec, skf=True, se=se, **family.smoke_model)
    for slot in family.se_slots:
        block = net.get_submodule(slot.path)
        assert type(block).__name__ == type(create(se, sem_channels=block.sem_channels, channels=16)).__name__
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        out = family.enhance(net, x, lambda stage, image: skb(image))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_a_swapped_se_variant_is_recorded_and_rebuilt(skb: Any, tmp_path: Path) -> None:
    family = get_family("baseline/snr-net@1")
    swapped = "se/restormer-xattn-gdfn@1"
    recipe = _recipe(family, True, **{"model.se": swapped})
    routine = build_routine(None, recipe, skb)
    assert type(routine.net.att_block_1).__name__ == "SemanticEmbedding"
    assert type(routine.net.att_block_1.ffn).__name__ == "GatedDConvFeedForward"  # not SNR's dual-gated FFN
    spec = make_spec(family.spec, routine.net, skb, baseline_kwargs=recipe.model)
    assert spec.baseline_kwargs["se"] == swapped
    save_enhancer(Enhancer(routine.net, skb, spec), tmp_path)
    rebuilt = load_enhancer_dir(tmp_path)
    assert rebuilt.net.state_dict().keys() == routine.net.state_dict().keys()


def _skb_kwargs(spec: str, tmp_path: Path) -> dict[str, Any]:
    """What building ``spec`` needs: the trained-segmenter SKB takes a package (random weights will do)."""
    from components.segmenter import SCENE_SEGMENTER_SPEC

    if spec != SCENE_SEGMENTER_SPEC:
        return {}
    from components.segmenter.package import save_segmenter
    from components.segmenter.training import new_model

    meta = {"classes": ["a", "b"], "input_transform": "linear"}
    return {"checkpoint": str(save_segmenter(new_model(0), tmp_path / "segmenter", meta).directory)}


@pytest.mark.parametrize("spec", sorted(e.key for e in registry.entries("skb")))
def test_every_skb_yields_priors_of_the_documented_shapes(spec: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    skb = create(spec, device="cpu", **_skb_kwargs(spec, tmp_path))
    h, w = 36, 52
    x = torch.rand(2, 3, h, w)
    with torch.no_grad():  # an oracle SKB makes its priors from a label map instead of the image
        p = (
            skb(x, labels=torch.zeros(2, h, w, dtype=torch.int64))
            if getattr(skb, "needs_labels", False)
            else skb(x)
        )
    up = lambda s: (-(-h // s), -(-w // s))  # noqa: E731 - ceil(H/s), ceil(W/s)
    c0, c1, c2 = skb.feature_channels
    assert tuple(p.f0.shape) == (2, c0, *up(4)) and tuple(p.f1.shape) == (2, c1, *up(8))
    assert tuple(p.f2.shape) == (2, c2, *up(16)) and tuple(p.logits.shape) == (2, skb.num_classes, *up(4))
    assert len(skb.fingerprint) == 64


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_passing_the_skbs_priors_object_straight_in_is_a_clear_error(
    family: BaselineFamily, skb: Any
) -> None:
    net = create(family.spec, skf=True, **family.smoke_model)
    x = torch.rand(2, 3, 32, 32)
    with (
        torch.no_grad(),
        pytest.raises(TypeError, match="not a Priors object; map it with the family's sem_inputs"),
    ):
        net(x, sem=skb(x))
    with torch.no_grad():  # what the family does instead
        assert family.enhance(net, x, lambda stage, image: skb(image)).shape == x.shape
