"""``skf demo``, the README's main job, as a user runs it: a subprocess with a private SKF_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_skf_demo_runs_end_to_end_and_says_where_to_look(tmp_path: Path) -> None:
    home = tmp_path / "skf-home"
    env = {
        **os.environ,
        "SKF_HOME": str(home),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "OMP_NUM_THREADS": "2",
    }
    for var in (
        "SKF_CATALOG_URL",
        "SKF_STORAGE_URI",
        "MLFLOW_TRACKING_URI",
        "SKF_WEIGHTS_URI",
        "PREFECT_API_URL",
    ):
        env.pop(var, None)
    skf = Path(sys.executable).parent / "skf"
    # 20 iterations instead of the preset's 60 keeps the test a few minutes on shared CPUs.
    done = subprocess.run(
        [str(skf), "demo", "--iterations", "20"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "models:/skf-demo@challenger" in out
    assert "never promoted" in out
    assert f"mlflow ui --backend-store-uri {(home / 'mlruns').as_uri()}" in out
    assert "test/psnr" in out
    assert (home / "demo-data" / "our485" / "low").is_dir()
    assert (home / "catalog.db").is_file()
