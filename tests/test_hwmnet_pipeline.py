"""HWMNet as a user meets it: `skf-train` on the demo data, the published weights, wrong files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pipeline_fixtures import make_tiny_dataset, recipe_params

from components.baselines import get_family
from components.checkpoints import StateDictMismatchError
from components.registry import create

SMOKE = {f"model.{k}": v for k, v in get_family("hwmnet").smoke_model.items()}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny-hwmnet") / "data")


@pytest.mark.slow
def test_skf_train_runs_hwmnet_skf_on_the_demo_data(
    prefect_harness: None, skf_home: Path, tiny_dataset: Path
) -> None:
    from flows.pipeline import skf_train

    overrides = {
        **SMOKE,
        "scheduler": {"name": "constant", "warmup": 0},
        "train": {"iterations": 4, "batch_size": 2, "crop": 32, "val_every": 2, "ckpt_every": 2},
    }
    params = recipe_params(tiny_dataset, "hwmnet-skf", overrides, "tiny-hwmnet")
    result = skf_train(params=params)
    assert result["train"]["status"] == "trained" and result["train"]["steps"] == 4
    assert "test/psnr" in result["evaluate"]["metrics"] and result["register"]["status"] == "registered"


def _published_like(tmp_path: Path) -> Path:
    """A file shaped like the published ``model_bestPSNR.pth``: DataParallel keys under ``state_dict``."""
    torch.manual_seed(0)
    state = create("baseline/hwmnet@1", skf=False).state_dict()
    path = tmp_path / "model_bestPSNR.pth"
    torch.save({"epoch": 100, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


def test_the_published_checkpoint_layout_fine_tunes_into_hwmnet_skf(tmp_path: Path) -> None:
    from components.checkpoints import load_checkpoint

    family = get_family("hwmnet")
    plain = create(family.spec, skf=False)
    assert family.load_official(plain, _published_like(tmp_path)) == len(plain.state_dict())
    skf = create(family.spec, skf=True)
    result = skf.load_state_dict(load_checkpoint(_published_like(tmp_path)).state_dict, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("att_block_") for k in result.missing_keys)


def test_a_drbn_checkpoint_or_a_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    from components.checkpoints import CheckpointError

    family = get_family("hwmnet")
    net = create(family.spec, skf=False, **family.smoke_model)
    drbn = tmp_path / "model_lol.pt"
    torch.save(create("baseline/drbn@1", skf=False).state_dict(), drbn)
    with pytest.raises(StateDictMismatchError) as info:
        family.load_official(net, drbn)
    message = str(info.value)
    assert "model_lol.pt" in message and "missing key(s)" in message and "unexpected key(s)" in message
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(_published_like(tmp_path).read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        family.load_official(net, truncated)
