"""Author-released checkpoints become registered models (`skf import-released`), verified and strict."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from components.registry import create
from flows.cli import main

SMALL = {"nf": 8, "nb": 2, "flow_steps": 1, "hidden": 16}


def _released_file(tmp_path: Path, sizes: dict | None = None) -> tuple[Path, str, dict]:
    """A checkpoint saved the way the released code saves it: DataParallel's ``module.`` on every key."""
    torch.manual_seed(0)
    net = create("baseline/llflow-s@1", skf=True, **(SMALL if sizes is None else sizes))
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path = tmp_path / "LOL_LLFlow_S_SKF.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), state


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


def _import_argv(path: Path, digest: str, name: str) -> list[str]:
    sizes = [f"--set=model.{k}={v}" for k, v in SMALL.items()]
    return ["import-released", "baseline/llflow-s@1", str(path), "--sha256", digest, "--name", name,
            "--skb", "skb/hrnet-w48-lite@1", *sizes]  # fmt: skip


def test_a_released_llflow_checkpoint_registers_and_enhances_like_its_weights(
    skf_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from components.serving import load_enhancer

    path, digest, state = _released_file(tmp_path)
    code, out, err = _cli(_import_argv(path, digest, "llflow-s-released"), capsys)
    assert code == 0, err
    assert "registered models:/llflow-s-released/1" in out and "paper-gt-mean" in out
    enhancer = load_enhancer("models:/llflow-s-released/1", device="cpu")
    loaded = enhancer.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # the released test's SKB: the log image, train-mode BN one image at a time
    assert (enhancer.skb.input_transform, enhancer.skb.bn_mode) == ("log", "train")
    x = torch.rand(1, 3, 40, 48)
    with torch.no_grad():
        assert enhancer(x).shape == x.shape


def test_a_wrong_digest_is_refused_before_the_file_is_read_and_nothing_is_registered(
    skf_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from components.tracking import mlflow_client

    path, digest, _ = _released_file(tmp_path)
    code, _, err = _cli(_import_argv(path, "0" * 64, "bad-digest"), capsys)
    assert code != 0 and str(path.name) in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli(_import_argv(path, digest[:12], "short-digest"), capsys)
    assert code == 2 and "full sha256 (64 hex digits)" in err
    assert not mlflow_client().search_registered_models()


def test_a_checkpoint_of_the_wrong_size_lists_its_keys_and_registers_nothing(
    skf_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from components.tracking import mlflow_client

    path, digest, _ = _released_file(tmp_path, sizes={})  # LLFlow-S-SKF at the released size
    argv = ["import-released", "baseline/llflow-l@1", str(path), "--sha256", digest, "--name", "s-into-l",
            "--skb", "skb/hrnet-w48-lite@1"]  # fmt: skip
    code, _, err = _cli(argv, capsys)
    assert code != 0 and "missing key(s)" in err and "unexpected key(s)" in err and "shape mismatch" in err
    assert not mlflow_client().search_registered_models()
