"""A loopback stand-in for a Kubernetes cluster with the Kubeflow Training Operator, for the PyTorchJob tests.

No cluster runs on the test machine, so this serves the part of the Kubernetes API the launcher uses
(create/get/delete ``pytorchjobs``, read a pod's log) over real HTTP, and plays the operator: every
replica of a submitted job becomes a local process (its "pod") running the manifest's ``pytorch``
container command with the environment the operator gives it (``MASTER_ADDR``/``PORT``, ``PET_*``,
``WORLD_SIZE``, ``RANK``), the container's ``env``, the variables of the Secrets named in ``envFrom``, and
a fresh ``SKF_HOME`` of its own: each pod is a separate machine. The job is Succeeded when every pod exits
0, Failed (and the other pods killed, as with ``backoffLimit: 0``) as soon as one does not. Each submitted
manifest is validated against :data:`tests.k8s_schemas.PYTORCHJOB_SCHEMA` first (422 otherwise).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import jsonschema

from tests.k8s_schemas import PYTORCHJOB_SCHEMA

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_JOBS = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/([^/]+)/pytorchjobs(?:/([^/]+))?$")
_POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pod:
    name: str
    home: Path
    log: Path
    process: subprocess.Popen[bytes]


@dataclass
class FakeJob:
    manifest: dict[str, Any]
    pods: list[Pod] = field(default_factory=list)
    failure: str | None = None
    deleted: bool = False

    def state(self) -> tuple[str, str]:
        if self.failure:
            return "Failed", self.failure
        codes = {pod.name: pod.process.poll() for pod in self.pods}
        bad = {name: code for name, code in codes.items() if code not in (None, 0)}
        if bad:
            name, code = sorted(bad.items())[0]
            self.failure = f"pod {name} exited with code {code}"
            for pod in self.pods:
                if pod.process.poll() is None:
                    pod.process.kill()
            return "Failed", self.failure
        if all(code == 0 for code in codes.values()):
            return "Succeeded", f"PyTorchJob {self.manifest['metadata']['name']} is successfully completed."
        return "Running", ""

    def status(self) -> dict[str, Any]:
        state, message = self.state()
        conditions = [{"type": "Created", "status": "True", "message": "created"}]
        conditions.append({"type": "Running", "status": "False" if state != "Running" else "True"})
        if state != "Running":
            conditions.append({"type": state, "status": "True", "message": message})
        return {"conditions": conditions}


class FakeCluster:
    """The API server and the operator; ``secrets`` maps a Secret name to its variables."""

    def __init__(self, root: Path, secrets: Mapping[str, Mapping[str, str]], *, crd_installed: bool = True):
        self.root = root
        self.secrets = {k: dict(v) for k, v in secrets.items()}
        self.crd_installed = crd_installed
        self.jobs: dict[str, FakeJob] = {}
        self.submitted: list[dict[str, Any]] = []
        #: the next this many reads of a job answer 503 (an API server restarting), then it recovers
        self.unavailable_reads = 0
        self.reads = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    # ------------------------------------------------------------------ the operator
    def _start_pods(self, job: FakeJob) -> None:
        spec, name = job.manifest["spec"], job.manifest["metadata"]["name"]
        nproc = int(spec.get("nprocPerNode", "1"))
        roles = [(role, i) for role in ("Master", "Worker")
                 for i in range(spec["pytorchReplicaSpecs"].get(role, {}).get("replicas", 0))]  # fmt: skip
        port = str(free_port())
        for rank, (role, index) in enumerate(roles):
            pod_name = f"{name}-{role.lower()}-{index}"
            template = spec["pytorchReplicaSpecs"][role]["template"]["spec"]
            (container,) = [c for c in template["containers"] if c["name"] == "pytorch"]
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SKF_", "MLFLOW_TRACKING"))}
            for source in container.get("envFrom", []):
                secret = source["secretRef"]["name"]
                if secret not in self.secrets:
                    job.failure = f"pod {pod_name}: secret {secret!r} not found"
                    return
                env.update(self.secrets[secret])
            env.update({e["name"]: e["value"] for e in container.get("env", [])})
            home = self.root / pod_name / "home"
            env.update({
                "SKF_HOME": str(home),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port,
                "PET_NNODES": str(len(roles)), "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(rank),
                "WORLD_SIZE": str(len(roles) * nproc), "RANK": str(rank), "PYTHONUNBUFFERED": "0",
            })  # fmt: skip
            command = [
                sys.executable if a == "python" else a for a in container["command"] + container["args"]
            ]
            home.mkdir(parents=True)
            log = self.root / pod_name / "log.txt"
            with log.open("wb") as out:
                process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=out)
            job.pods.append(Pod(pod_name, home, log, process))

    def pod_home(self, job_name: str, role: str, index: int) -> Path:
        return self.root / f"{job_name}-{role.lower()}-{index}" / "home"

    # ------------------------------------------------------------------ the API
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep the test output clean
                return

            def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                  "reason": reason, "message": message, "code": code})  # fmt: skip

            def _route(self) -> tuple[str, str | None] | None:
                match = _JOBS.match(urlparse(self.path).path)
                if match is None or not cluster.crd_installed:
                    self._status(404, "NotFound", "the server could not find the requested resource")
                    return None
                return match.group(1), match.group(2)

            def do_POST(self) -> None:
                route = self._route()
                if route is None:
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                try:
                    jsonschema.validate(body, PYTORCHJOB_SCHEMA)
                except jsonschema.ValidationError as exc:
                    self._status(422, "Invalid", exc.message)
                    return
                if body["metadata"].get("namespace", route[0]) != route[0]:
                    self._status(400, "BadRequest", "the namespace of the object does not match the URL")
                    return
                with cluster.lock:
                    name = body["metadata"]["name"]
                    if name in cluster.jobs:
                        self._status(409, "AlreadyExists", f"pytorchjobs {name!r} already exists")
                        return
                    cluster.submitted.append(body)
                    job = cluster.jobs[name] = FakeJob(body)
                    cluster._start_pods(job)
                self._send(201, body)

            def do_GET(self) -> None:
                log_match = _POD_LOG.match(urlparse(self.path).path)
                if log_match is not None:
                    self._pod_log(log_match.group(2))
                    return
                with cluster.lock:
                    cluster.reads += 1
                    unavailable = cluster.unavailable_reads > 0
                    cluster.unavailable_reads -= unavailable
                if unavailable:
                    self._status(503, "ServiceUnavailable", "the API server is restarting")
                    return
                job = self._job()
                if job is not None:
                    with cluster.lock:
                        self._send(200, {**job.manifest, "status": job.status()})

            def _job(self) -> FakeJob | None:
                """The job the URL names, or None once a 404 is sent."""
                route = self._route()
                if route is None:
                    return None
                job = cluster.jobs.get(route[1] or "")
                if job is None or job.deleted:
                    self._status(404, "NotFound", f"pytorchjobs {route[1]!r} not found")
                    return None
                return job

            def do_DELETE(self) -> None:
                job = self._job()
                if job is None:
                    return
                job.deleted = True
                for pod in job.pods:
                    if pod.process.poll() is None:
                        pod.process.kill()
                self._send(200, {"kind": "Status", "status": "Success"})

            def _pod_log(self, pod_name: str) -> None:
                pods = [p for job in cluster.jobs.values() for p in job.pods if p.name == pod_name]
                if not pods:
                    self._status(404, "NotFound", f"pods {pod_name!r} not found")
                    return
                lines = pods[0].log.read_text(errors="replace").splitlines()
                tail = parse_qs(urlparse(self.path).query).get("tailLines")
                if tail:
                    lines = lines[-int(tail[0]) :]
                self._send(200, "\n".join(lines) + "\n", "text/plain")

        return Handler

    # ------------------------------------------------------------------ lifecycle
    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig file pointing at this server (what ``KUBECONFIG`` names)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [
                {"name": "fake", "context": {"cluster": "fake", "user": "tester", "namespace": "skf"}}
            ],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config))
        return path

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for job in self.jobs.values():
            for pod in job.pods:
                if pod.process.poll() is None:
                    pod.process.kill()
                pod.process.wait(timeout=30)


@contextmanager
def fake_cluster(
    root: Path, secrets: Mapping[str, Mapping[str, str]], **kwargs: Any
) -> Iterator[FakeCluster]:
    cluster = FakeCluster(root, secrets, **kwargs)
    thread = threading.Thread(target=cluster.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        thread.join(timeout=10)
