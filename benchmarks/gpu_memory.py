"""Peak GPU memory of one SKF training step per family and variant (the recipe's batch and crop).

For each family, each variant (a: plain, b-nosa: SE + SCH, b: the whole SKF step) is built on the GPU, one
step warms up (cuDNN, Adam's state), the allocator's peak is reset and a second step is measured:
``torch.cuda.max_memory_allocated`` in MiB, beside what the variant holds between steps. The issue's
comparison is the released code's figures (about 21 GB for SNR-SKF, over 20 GB for LLFlow-S-SKF, over 30 GB
for LLFlow-L-SKF at the recipe batch and crop).

    python benchmarks/gpu_memory.py --models drbn,snr-net --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_mib(model: str, variant: str, device: str) -> dict[str, Any]:
    import torch
    from train_step import Runner, shape  # noqa: PLC0415 (after the sys.path setup)

    runner = Runner(model, variant, None, device)
    runner.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resting = torch.cuda.memory_allocated()
    runner.step()
    torch.cuda.synchronize()
    batch, crop = shape(model)
    out = {
        "batch": batch,
        "crop": crop,
        "resting_mib": resting / 2**20,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
    }
    del runner
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma list of families (default: every registered one)")
    ap.add_argument("--variants", default="a,b-nosa,b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        raise SystemExit("gpu_memory.py measures CUDA memory: run it on a GPU machine (--device cuda)")
    from train_step import family_names, variants_of  # noqa: PLC0415

    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "models": {}}
    for model in [m for m in args.models.split(",") if m] or family_names():
        wanted = [v for v in args.variants.split(",") if v in variants_of(model)]
        report["models"][model] = {v: peak_mib(model, v, args.device) for v in wanted}
        for v, r in report["models"][model].items():
            print(f"{model} {v} ({r['batch']} x {r['crop']}²): peak {r['peak_mib']:.0f} MiB", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
