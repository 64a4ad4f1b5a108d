"""Several GPUs on one host: a training with ``gpus: N`` runs as N ``torchrun`` processes (DDP).

(Several hosts: :mod:`components.training.pytorchjob` runs the same ``main`` in every pod of a PyTorchJob.)

:func:`launch_distributed` is what :func:`~components.training.job.run_training` does for ``plan.gpus > 1``:
it writes the request to a temporary folder and starts ``python -m torch.distributed.run --standalone
--nproc_per_node N -m components.training.launch ...`` in the project folder. Every process runs
``run_training`` inside the process group: rank 0 does the job's bookkeeping (catalog lease, MLflow run,
checkpoints and their copies, the enhancer package) and tells the others whether to train; all ranks train
in lockstep. Rank 0 writes the outcome (or the error) as JSON for the parent, which relays rank 0's log lines
as they come. A failure of any rank makes torchrun stop the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.errors import SKFError

__all__ = ["DistributedTrainingError", "launch_distributed", "main"]

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class DistributedTrainingError(SKFError, RuntimeError):
    """The torchrun job failed; the message is rank 0's error, or torchrun's exit status and last lines."""


def _command(workdir: Path, gpus: int, version_ref: str, stop_after_step: int | None) -> list[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
        "-m", "components.training.launch",
        "--version", version_ref,
        "--request", str(workdir / "request.json"),
        "--outcome", str(workdir / "outcome.json"),
    ]  # fmt: skip
    if stop_after_step is not None:
        cmd += ["--stop-after-step", str(stop_after_step)]
    return cmd


def launch_distributed(
    version_ref: str,
    plan: Any,
    *,
    stop_after_step: int | None = None,
    log: Callable[[str], None] = print,
) -> Any:
    """Train ``plan`` with ``plan.gpus`` torchrun processes on this host; returns rank 0's TrainOutcome."""
    with tempfile.TemporaryDirectory(prefix="skf-launch-") as tmp:
        workdir = Path(tmp)
        (workdir / "request.json").write_text(plan.request.model_dump_json())
        cmd = _command(workdir, plan.gpus, version_ref, stop_after_step)
        log(f"launching {plan.gpus} training processes: torchrun --standalone --nproc_per_node={plan.gpus}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, stated so it is not a surprise
        tail: list[str] = []
        with subprocess.Popen(
            cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                tail = (tail + [line])[-20:]
                log(line)
        result_file = workdir / "outcome.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else None
    return outcome_from(
        result,
        failed=proc.returncode != 0,
        what=f"torchrun with {plan.gpus} processes exited with status {proc.returncode}",
        tail=tail,
    )


def outcome_from(result: dict[str, Any] | None, *, failed: bool, what: str, tail: list[str]) -> Any:
    """Rank 0's TrainOutcome from its outcome file; its error, or ``what`` and the last log lines, raised."""
    from components.training.job import TrainingInterrupted, TrainOutcome

    if result is not None and "error" in result:
        error = result["error"]
        kind = TrainingInterrupted if error["type"] == "TrainingInterrupted" else DistributedTrainingError
        raise kind(error["message"])
    if failed or result is None:
        raise DistributedTrainingError(f"{what}; last lines:\n" + "\n".join(tail))
    return TrainOutcome(**result["outcome"])


def main(argv: list[str] | None = None) -> int:
    """One torchrun process: join the group, run the training, rank 0 writes the outcome file."""
    import torch
    import torch.distributed as dist

    from components.training.distributed import init_from_env, shutdown
    from components.training.job import follow_leader, progress_every_tenth, run_training
    from components.training.plan import TrainingRequest, plan

    args = _parser().parse_args(argv)
    raw = os.environ[args.request_env] if args.request_env else Path(args.request).read_text()
    request = TrainingRequest.model_validate_json(raw)
    training_plan = plan(request)
    wants_cuda = (request.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    info = init_from_env("cuda" if wants_cuda else "cpu")
    write_result = _result_writer(args.outcome, args.outcome_key)
    try:
        if info.is_main:
            outcome = run_training(
                args.version,
                training_plan,
                progress=progress_every_tenth(lambda fmt, *values: print(fmt % values)),
                stop_after_step=args.stop_after_step,
                log=print,
            )
            write_result({"outcome": outcome.to_dict()})
        else:
            follow_leader(args.version, training_plan)
    except BaseException as exc:
        if info.is_main:
            write_result({"error": {"type": type(exc).__name__, "message": str(exc)}})
        raise
    finally:
        if dist.is_initialized():
            shutdown(info)
    return 0


def _result_writer(path: str | None, key: str | None) -> Callable[[dict[str, Any]], None]:
    """Where rank 0 leaves its outcome: a local file (one host) or a key of SKF_STORAGE_URI (a PyTorchJob,
    whose submitter runs on another machine)."""
    if key is None:
        assert path is not None
        return lambda payload: Path(path).write_text(json.dumps(payload))
    from components.settings import get_settings
    from components.storage import open_storage

    storage = open_storage(get_settings().storage_uri)
    return lambda payload: storage.put_bytes(key, json.dumps(payload).encode())


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="one process of a multi-GPU training (started by torchrun)")
    ap.add_argument("--version", required=True)
    request = ap.add_mutually_exclusive_group(required=True)
    request.add_argument("--request", help="the TrainingRequest as a JSON file")
    request.add_argument("--request-env", help="the name of a variable holding the TrainingRequest JSON")
    outcome = ap.add_mutually_exclusive_group(required=True)
    outcome.add_argument("--outcome", help="file rank 0 writes its outcome (or error) to")
    outcome.add_argument("--outcome-key", help="key of SKF_STORAGE_URI rank 0 writes its outcome to")
    ap.add_argument("--stop-after-step", type=int, default=None)
    return ap


if __name__ == "__main__":
    sys.exit(main())
