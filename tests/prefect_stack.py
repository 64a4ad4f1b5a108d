"""A real Prefect server on loopback and the helpers the end-to-end tests drive it with.

Processes run as a user would start them (``prefect server start``, ``prefect worker start``), each with the
environment it is given; every process is stopped by PID whatever happens.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen[bytes], sig: int, timeout: float = 30) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class Stack:
    """Environment and helpers around the running server."""

    def __init__(self, env: dict[str, str], api: str, logs: Path) -> None:
        self.env, self.api, self.logs = env, api, logs

    def cli(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run(
            [str(BIN / "prefect"), *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def run_deployment(self, params: dict[str, Any]) -> str:
        """``skf-train/demo`` with ``params``; returns the flow run's id."""
        return self.run_named("skf-train/demo", {"params": params})

    def run_named(self, deployment: str, parameters: dict[str, Any]) -> str:
        """``prefect deployment run <deployment> --params <parameters>``; returns the flow run's id."""
        out = self.cli("deployment", "run", deployment, "--params", json.dumps(parameters))
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert match, out
        return match.group(1)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """A filter query of the API (``/logs/filter``, ``/flow_runs/filter``, ...)."""
        return httpx.post(f"{self.api}/{path}", json=body, timeout=10).json()

    def wait(self, flow_run_id: str, timeout: float = RUN_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = httpx.get(f"{self.api}/flow_runs/{flow_run_id}", timeout=10).json()["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return state
            time.sleep(2)
        raise AssertionError(f"flow run {flow_run_id} not finished after {timeout}s; logs in {self.logs}")

    def summary(self, flow_run_id: str) -> str:
        """The skf-train summary markdown published by that flow run."""
        body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "type": {"any_": ["markdown"]}}}
        artifacts = httpx.post(f"{self.api}/artifacts/filter", json=body, timeout=10).json()
        texts = [a["data"] for a in artifacts if (a.get("key") or "").startswith("skf-train-")]
        assert texts, f"no skf-train summary artifact for {flow_run_id}"
        return texts[0]


def wait_healthy(
    proc: subprocess.Popen[bytes], health_url: str, log: Path, what: str, timeout: float = 180
) -> None:
    """Until ``health_url`` answers 200; fails with the end of ``log`` if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{what} exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{what} not healthy after {timeout:.0f} s"
        time.sleep(1)


@contextmanager
def prefect_server(env: dict[str, str], logs: Path) -> Iterator[Stack]:
    """``prefect server start`` on a free loopback port with ``env`` (its PREFECT_HOME); yields a Stack."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**env, "PREFECT_API_URL": api}
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=(logs / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(server, f"{api}/health", logs / "server.log", "Prefect server")
        yield Stack(env, api, logs)
    finally:
        stop(server, signal.SIGTERM)


def start_worker(
    stack: Stack, pool: str, name: str, env: dict[str, str], *extra: str
) -> subprocess.Popen[bytes]:
    """``prefect worker start`` for ``pool`` with ``env`` merged over the stack's; logs to ``<name>.log``."""
    return subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name, *extra],
        cwd=REPO,
        env={**stack.env, **env},
        stdout=(stack.logs / f"{name}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
