"""Benchmark: vectorised SCH loss vs a loop reference shaped like the official ``hist_loss``.

Times forward + backward on the DRBN-SKF training batch (4×3×256×256, 59 classes) and reports the
speed-up and the peak memory of each implementation (each runs in its own child process so peaks are
separate: CUDA ``max_memory_allocated`` on GPU, peak RSS above the post-setup baseline on CPU). On a
shared CPU the process CPU time is the fairer comparison; wall time is printed as well. The losses must
agree to 1e-5 relative (exit status 1 otherwise).

    python benchmarks/sch_speed.py                 # CPU, 2 threads, jemalloc
    python benchmarks/sch_speed.py --malloc glibc --json sch.json
    python benchmarks/sch_speed.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from runtime import MALLOCS, describe, reexec_with  # noqa: E402

from models.sch import sch_loss  # noqa: E402


def loop_reference(pred, target, labels, num_classes: int, bins: int = 256, sharpness: float = 400.0):
    """Official structure: Python loop over N × classes × 3 with ``nonzero`` and a full 256-bin kernel."""
    n, c, h, w = pred.shape
    delta = 1.0 / bins
    centres = (torch.arange(bins, device=pred.device, dtype=torch.float32) + 0.5) * delta
    pred, target, labels = pred.reshape(n, c, -1), target.reshape(n, c, -1), labels.reshape(n, -1)

    def hist(values):
        t = values.unsqueeze(0) - centres.unsqueeze(1)
        return (torch.sigmoid(sharpness * (t + delta / 2)) - torch.sigmoid(sharpness * (t - delta / 2))).sum(
            1
        )

    terms = []
    for i in range(n):
        for k in range(num_classes):
            idx = torch.nonzero(labels[i] == k).squeeze(1)
            p, t = pred[i][:, idx], target[i][:, idx]
            for ch in range(c):
                terms.append(F.l1_loss(hist(p[ch]), hist(t[ch])))
    return sum(terms) / (n * num_classes * h * w * c)


def make_batch(batch: int, size: int, classes: int, device: str):
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(batch, 3, size, size, generator=g)
    target = torch.rand(batch, 3, size, size, generator=g)
    # Blocky label map (16×16 segments) like a real segmentation, all classes present somewhere.
    coarse = torch.randint(0, classes, (batch, 1, size // 16, size // 16), generator=g).float()
    labels = F.interpolate(coarse, size=(size, size), mode="nearest").squeeze(1).long()
    return pred.to(device), target.to(device), labels.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(impl: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    pred, target, labels = make_batch(args.batch, args.size, args.classes, args.device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    def step():
        p = pred.clone().requires_grad_(True)
        if impl == "vectorised":
            loss = sch_loss(p, target, labels, num_classes=args.classes, normalizer="nchw3")
        else:
            loss = loop_reference(p, target, labels, args.classes)
        loss.backward()
        return loss.detach()

    repeats = args.repeats if impl == "vectorised" else args.reference_repeats
    value = step()  # warm-up
    _sync(args.device)
    times, cpu_times = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        value = step()
        _sync(args.device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if args.device.startswith("cuda"):
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return {
        "impl": impl,
        "seconds": min(times),
        "cpu_seconds": min(cpu_times),
        "peak_mb": peak_mb,
        "loss": float(value),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--classes", type=int, default=59)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--reference-repeats", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="(vectorised, reference) process pairs")
    ap.add_argument("--malloc", choices=MALLOCS, default="jemalloc")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--only", choices=["vectorised", "reference"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cpu":
        reexec_with(args.malloc, args.threads)

    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return

    shape = f"{args.batch}x3x{args.size}x{args.size}, {args.classes} classes"
    setting = describe(args.malloc) if args.device == "cpu" else args.device
    print(f"SCH forward+backward on {shape}, device={args.device}, threads={args.threads}, {setting}")
    # Rounds of (vectorised, reference) child pairs: a shared machine's slow minutes hit single runs hard,
    # so the verdict is the median of the per-round ratios, each from two back-to-back processes.
    rounds, ratios_wall, ratios_cpu, rel = [], [], [], 0.0
    for r in range(args.rounds):
        results = {}
        for impl in ("vectorised", "reference"):
            cmd = [sys.executable, __file__, "--only", impl, *sys.argv[1:]]
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
        vec, ref = results["vectorised"], results["reference"]
        ratios_wall.append(ref["seconds"] / vec["seconds"])
        ratios_cpu.append(ref["cpu_seconds"] / vec["cpu_seconds"])
        rel = max(rel, abs(vec["loss"] - ref["loss"]) / abs(ref["loss"]))
        rounds.append(results)
        print(f"  round {r + 1}/{args.rounds}")
        for x in (vec, ref):
            print(
                f"    {x['impl']:<10}  wall {x['seconds'] * 1e3:8.1f} ms  process CPU {x['cpu_seconds'] * 1e3:8.1f} ms"
                f"  peak {x['peak_mb']:7.1f} MiB  loss {x['loss']:.8g}"
            )
        print(f"    speed-up   {ratios_wall[-1]:.1f}x wall, {ratios_cpu[-1]:.1f}x process CPU time")
    speedup_wall, speedup_cpu = statistics.median(ratios_wall), statistics.median(ratios_cpu)
    print(
        f"  median speed-up over {args.rounds} rounds: {speedup_wall:.1f}x wall, {speedup_cpu:.1f}x process CPU"
        f" (range {min(ratios_wall):.1f}-{max(ratios_wall):.1f}x wall)"
    )
    print(f"  loss relative difference {rel:.2e} (must be <= 1e-5)")
    if args.json:
        summary = {"speedup_wall": speedup_wall, "speedup_cpu": speedup_cpu, "relative_difference": rel}
        args.json.write_text(json.dumps({"rounds": rounds, **summary, "setting": setting}, indent=2))
    if rel > 1e-5:
        sys.exit(1)


if __name__ == "__main__":
    main()
