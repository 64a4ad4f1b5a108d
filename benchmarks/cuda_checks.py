"""CUDA checks of the SKF modules (run on a GPU machine; the CPU test suite covers the same maths).

* SE: the low-resolution prior path equals the explicitly upsampled computation on the GPU (fp32, TF32
  off): output and every gradient, for SNR's x4 and DRBN's x2 blocks;
* SE under autocast (fp16 and bf16): finite output and gradients, close to fp32;
* SCH: the loss and its gradient on CUDA equal the CPU ones (fp32, also when called under fp16 autocast).

Exit status 1 when a check fails. ``python benchmarks/cuda_checks.py [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.sch import sch_loss  # noqa: E402
from models.se import SemanticEmbedding  # noqa: E402

# (sem channels, channels, ffn, gelu, batch, host size, factor): SNR att_block_1, DRBN fuseblk_2
SE_CASES = [(48, 64, "dual-gated", "exact", 4, 128, 4), (48, 16, "gdfn", "tanh", 4, 128, 2)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _run_se(block, x, sem, weight):
    for t in (x, sem, *block.parameters()):
        t.grad = None
    out = block(x, sem)
    (out.float() * weight).sum().backward()
    grads = [x.grad, sem.grad] + [p.grad for p in block.parameters() if p.requires_grad]
    return out.detach(), [g.detach().clone() for g in grads]


def check_se_fast_path(device: torch.device) -> list[dict]:
    results = []
    for cs, c, ffn, gelu, n, size, factor in SE_CASES:
        torch.manual_seed(0)
        block = SemanticEmbedding(cs, c, ffn=ffn, gelu=gelu).to(device)
        x = torch.randn(n, c, size, size, device=device, requires_grad=True)
        low = torch.randn(n, cs, size // factor, size // factor, device=device, requires_grad=True)
        weight = torch.randn(n, c, size, size, device=device)
        fast_out, fast = _run_se(block, x, low, weight)
        up = F.interpolate(low.detach(), scale_factor=factor, mode="nearest").requires_grad_(True)
        ref_out, ref = _run_se(block, x, up, weight)
        # the upsampled prior's gradient, pooled back onto the low-resolution grid
        ref[1] = F.avg_pool2d(ref[1], factor) * factor * factor
        worst = max([_rel(fast_out, ref_out)] + [_rel(a, b) for a, b in zip(fast, ref, strict=True)])
        amp = {}
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            with torch.autocast("cuda", dtype=dtype):
                out_amp, grads_amp = _run_se(block, x, low, weight)
            finite = bool(torch.isfinite(out_amp).all()) and all(
                bool(torch.isfinite(g).all()) for g in grads_amp
            )
            amp[name] = {"finite": finite, "output_rel_diff": _rel(out_amp, fast_out)}
        ok = worst < 1e-4 and all(v["finite"] and v["output_rel_diff"] < 0.05 for v in amp.values())
        results.append(
            {"case": f"{ffn} C{c} x{factor} {n}x{size}²", "fp32_max_rel_diff": worst, "amp": amp, "ok": ok}
        )
    return results


def check_sch(device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(4, 3, 256, 256, generator=g)
    target = torch.rand(4, 3, 256, 256, generator=g)
    labels = torch.randint(0, 59, (4, 256, 256), generator=g)
    outs = {}
    for where, dev in (("cpu", torch.device("cpu")), ("cuda", device), ("cuda-fp16-autocast", device)):
        p = pred.detach().clone().to(dev).requires_grad_(True)
        if where.endswith("autocast"):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = sch_loss(p, target.to(dev), labels.to(dev), num_classes=59)
        else:
            loss = sch_loss(p, target.to(dev), labels.to(dev), num_classes=59)
        loss.backward()
        outs[where] = (loss.detach().cpu(), p.grad.cpu(), loss.dtype)
    ref_loss, ref_grad, _ = outs["cpu"]
    res = {
        k: {"loss_rel_diff": _rel(v[0], ref_loss), "grad_rel_diff": _rel(v[1], ref_grad), "dtype": str(v[2])}
        for k, v in outs.items()
        if k != "cpu"
    }
    ok = all(
        v["loss_rel_diff"] < 1e-5 and v["grad_rel_diff"] < 1e-4 and v["dtype"] == "torch.float32"
        for v in res.values()
    )
    return {"results": res, "ok": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: these checks need a GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "se": check_se_fast_path(device),
        "sch": check_sch(device),
    }
    report["ok"] = all(r["ok"] for r in report["se"]) and report["sch"]["ok"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    raise SystemExit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
