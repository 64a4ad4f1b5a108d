"""Small enhancers for the registry and serving tests, and a real MLflow server on loopback.

The SKB is ``skb/hrnet-w48-lite@1``: the W48 feature widths the SE blocks need (``hrnet-w18-small-test``
has W18 widths and does not fit them) with one block per branch, fast on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

from components.inference import Enhancer, make_spec
from components.registry import create
from models.hrnet import HRNet, hrnet_w48_lite_config

TINY_SKB = "skb/hrnet-w48-lite@1"
SNR_SMALL: dict[str, Any] = {"nf": 16, "n_layers": 1, "d_inner": 64, "light_blocks": 1}


def random_skb_checkpoint(path: Path, seed: int = 1) -> Path:
    """A weights-only checkpoint of random w48-lite HRNet weights: loading it makes ``pretrained=True``."""
    model = HRNet(hrnet_w48_lite_config(59))
    model.init_weights("kaiming", generator=torch.Generator().manual_seed(seed))
    torch.save(model.state_dict(), path)
    return path


def make_enhancer(
    baseline: str = "baseline/snr-net@1",
    *,
    skf: bool = True,
    checkpoint: Path | None = None,
    two_pass: bool = False,
    seed: int = 0,
) -> Enhancer:
    """A small enhancer with seeded weights; ``checkpoint`` loads the SKB (then it counts as pretrained)."""
    torch.manual_seed(seed)
    kwargs = dict(SNR_SMALL) if baseline.startswith("baseline/snr-net") else {}
    net = create(baseline, skf=skf, **kwargs)
    skb = create(TINY_SKB, checkpoint=checkpoint, device="cpu") if skf else None
    spec = make_spec(baseline, net, skb, baseline_kwargs=kwargs, two_pass=two_pass)
    return Enhancer(net, skb, spec).eval()


# --------------------------------------------------------------------------------------------------
# A real MLflow tracking server on loopback
# --------------------------------------------------------------------------------------------------
def start_mlflow_server(root: Path, port: int, timeout: float = 180.0) -> subprocess.Popen[bytes]:
    """``mlflow server`` with a SQLite backend and proxied artifacts (``mlflow-artifacts:/``) under ``root``.

    Artifacts travel over HTTP through the server, as for a remote client; returns once ``/health`` answers.
    """
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_file = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=root,
    )
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with {proc.returncode}: {(root / 'server.log').read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_process(proc)
    raise RuntimeError(
        f"mlflow server not healthy after {timeout}s: {(root / 'server.log').read_text()[-3000:]}"
    )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
