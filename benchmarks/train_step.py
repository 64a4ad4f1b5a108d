"""Benchmark: cost of SKF on one real training step (forward, backward, optimiser) on CPU.

For DRBN (batch 4, 256x256 crops) and SNR-Net (batch 16, 128x128), at the recipe batch and crop, the
step of :class:`~components.baselines.drbn.DRBNRoutine` / ``SNRRoutine`` is timed through the engine's
:class:`~components.training.engine.StepContext` for

* ``a``  plain baseline (recipes ``drbn``, ``snr-net``);
* ``b``  baseline + SKF with cached priors (random fp16 maps shaped like the prior cache's crop output;
  no HRNet runs; SNR's SCH is applied on every timed step, i.e. its every-50th-step worst case);
* ``b-nosa`` (DRBN only) ``b`` without SA: the SE + SCH part of the DRBN-SKF step;
* ``b-se`` (SNR-Net only) ``b`` on the recipe's steps without SCH (49 of 50); with ``b`` it gives the
  recipe's amortised SKF step ``(49·b-se + b) / 50``;
* ``c``  baseline + SKF with the HRNet-W48 SKB online (random init; DRBN: on r3 and on the output, as
  released; SNR: on the low-light crop).

Variants are interleaved round by round (a, b, ..., a, b, ...) in one process so load drift hits both
sides of a ratio. Each round also times the SE blocks, the SCH loss and the SA losses of ``b`` in
isolation (forward + backward, SA incl. the D optimiser step) for the component shares. With
``--memory`` every variant is re-run in a fresh child process for its peak RSS (``VmHWM``). ``--layout``
picks the networks' internal memory layout for every variant (default ``auto``: as built, channels-last on
CPU and NCHW on CUDA); ``--sa-precision`` the DRBN-SKF discriminator step's (recipe ``skf.sa.precision``,
default ``auto``: bf16 autocast where the device has native bf16, e.g. an AVX512-BF16 CPU); ``--cpu-kernels``
whether the SE blocks' fused CPU ops are built and used (default ``auto``, as the training engine does on CPU;
``off`` keeps the eager ops).

    python benchmarks/train_step.py --threads 2 --malloc jemalloc --memory \\
        --json bench.json --markdown bench.md
    python benchmarks/train_step.py --models snr-net --variants a,b --steps 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import MALLOCS, describe, reexec_with  # noqa: E402

MODELS = {"drbn": (4, 256), "snr-net": (16, 128)}  # recipe batch, crop
LAYOUTS = {"auto": None, "channels-last": True, "nchw": False}
#: The networks' internal layout for this run (``--layout``); the builders' ``channels_last`` override.
LAYOUT: dict[str, bool | None] = {"channels_last": None}
SA_PRECISIONS = ("auto", "fp32", "bf16")
#: The DRBN-SKF discriminator step's precision for this run (``--sa-precision``; recipe ``skf.sa.precision``).
SA: dict[str, str] = {"precision": "auto"}
VARIANTS = {"drbn": ("a", "b", "b-nosa", "c"), "snr-net": ("a", "b", "b-se", "c")}
LABELS = {
    "a": "plain baseline",
    "b": "+SKF, cached priors",
    "b-nosa": "+SE+SCH, cached priors (no SA)",
    "b-se": "+SE only, cached priors (SNR's 49 of 50 steps without SCH)",
    "c": "+SKF, W48 SKB online",
}


# ---------------------------------------------------------------------------------------------------
# Building the real routines
# ---------------------------------------------------------------------------------------------------
def recipe_for(model: str, variant: str) -> Any:
    from components.recipes import load_recipe

    over: dict[str, Any] = {"model": dict(LAYOUT)}
    if variant == "a":
        return load_recipe(model, over)
    if model == "snr-net":
        # b: time the steps that carry SCH; b-se: the recipe's every-50th schedule, which the few timed
        # steps (1, 2, ...) never reach
        over["skf"] = {"sch": {"every": 1 if variant != "b-se" else 50}}
        if variant == "c":
            over["skf"].update({"skb_mode": "online", "skb_input": "lq"})
    elif variant in ("b", "b-nosa"):
        over["skf"] = {"skb_mode": "cached", "skb_input": "lq", "sa": {"precision": SA["precision"]}}
        if variant == "b-nosa":
            over["skf"]["sa"] = {"enabled": False}
    else:  # DRBN c: the recipe as shipped (online SKB on the intermediate output)
        over["skf"] = {"sa": {"precision": SA["precision"]}}
    return load_recipe(f"{model}-skf", over)


def make_batch(model: str, variant: str, seed: int = 0) -> dict[str, Any]:
    import torch

    n, s = MODELS[model]
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, Any] = {
        "low": torch.rand(n, 3, s, s, generator=g) * 0.3,
        "high": torch.rand(n, 3, s, s, generator=g),
    }
    if variant in (
        "b",
        "b-nosa",
        "b-se",
    ):  # what PriorsLoader delivers for a crop: fp16 maps at 1/4, 1/8, 1/16
        shapes = {"f0": (48, 4), "f1": (96, 8), "f2": (192, 16), "logits": (59, 4)}
        batch["priors"] = {
            k: (torch.randn(n, c, s // st, s // st, generator=g) * (3.0 if k == "logits" else 1.0)).half()
            for k, (c, st) in shapes.items()
        }
    return batch


class Runner:
    """One variant: the routine, its StepContext and a fixed random batch."""

    def __init__(self, model: str, variant: str, skb: Any, device: str = "cpu", amp: str = "off") -> None:
        import torch

        from components.training.engine import StepContext, move_to_device
        from components.training.routines import build_routine

        torch.manual_seed(0)
        self.model, self.variant = model, variant
        self.device = torch.device(device)
        self.recipe = recipe_for(model, variant)
        self.routine = build_routine(None, self.recipe, skb if variant == "c" else None)
        modules = self.routine.modules()
        for m in modules.values():
            m.to(self.device).train()  # before the optimisers: they keep the same Parameter objects
        self.schedulers = self.routine.schedulers()
        amp_on = amp != "off" and self.device.type == "cuda"
        amp_dtype = torch.float16 if amp == "fp16" else torch.bfloat16
        self.ctx = StepContext(
            device=self.device,
            modules=modules,
            optimizers=self.routine.optimizers(),
            scaler=torch.amp.GradScaler(self.device.type, enabled=amp_on and amp_dtype == torch.float16),
            amp_enabled=amp_on,
            amp_dtype=amp_dtype,
            grad_clip=self.recipe.train.grad_clip,
        )
        self.batch = move_to_device(make_batch(model, variant), self.device)
        self.step_no = 0

    def step(self) -> dict[str, float]:
        self.step_no += 1
        self.ctx.step = self.step_no
        metrics = self.routine.train_step(self.batch, self.step_no, self.ctx)
        self.ctx.scaler.update()  # as the engine's loop does after every iteration (no-op unless fp16 AMP)
        for s in self.schedulers.values():
            s.step()
        return {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------
# SE / SCH / SA of variant b in isolation
# ---------------------------------------------------------------------------------------------------
def component_probes(runner: Runner) -> dict[str, Callable[[], None]]:
    """Forward + backward of each SKF part of ``runner``'s step, on the step's own shapes and modules."""
    import torch

    from components.skb import Priors
    from models.padding import working_layout

    routine, batch, device = runner.routine, runner.batch, runner.device
    priors = Priors(**{k: v.float() for k, v in batch["priors"].items()})
    high = batch["high"]
    n, _, h, w = high.shape
    g = torch.Generator().manual_seed(1)
    net = routine.net
    if runner.model == "drbn":
        blocks = [net.recur4.fuseblk_1, net.recur4.fuseblk_2, net.recur4.fuseblk_3]
        hosts = [(32, 4), (16, 2), (16, 1)]
    else:
        blocks = [net.att_block_3, net.att_block_2, net.att_block_1]
        hosts = [(64, 4), (64, 2), (64, 1)]
    # host features in the layout the network runs in (channels-last on CPU unless --layout nchw)
    xs = [
        working_layout(torch.randn(n, c, h // k, w // k, generator=g).to(device), net.channels_last)
        for c, k in hosts
    ]
    # The gradient each block gets from the layer after it, in the same layout. (A scalar loss such as
    # ``out.square().mean()`` hands back an NCHW gradient, and accumulating the block's channels-last
    # gradients into it costs ~0.2 s per SNR-Net step that the real step never pays.)
    upstream = [working_layout(torch.randn(x.shape, generator=g).to(device), net.channels_last) for x in xs]

    def se() -> None:
        if runner.model == "drbn":  # DRBN's SE inputs (F1, F0, full-res logits Z), as _drbn_sem builds them
            sems = [priors.f1, priors.f0, priors.full_logits((h, w), channels_last=True)]
        else:
            sems = [priors.f2, priors.f1, priors.f0]
        outs = []
        for block, x, sem in zip(blocks, xs, sems, strict=True):
            x.grad = None  # the input gradient is computed as in the step, not accumulated across rounds
            outs.append(block(x.requires_grad_(True), sem))
        torch.autograd.backward(outs, upstream)

    fake0 = torch.rand(n, 3, h, w, generator=g).to(device)

    def sch() -> None:
        fake = fake0.clone().requires_grad_(True)
        routine.sch(fake, high, priors.labels((h, w))).backward()

    probes = {"SE": se, "SCH": sch}
    sa = getattr(routine, "sa", None)
    if sa is not None:
        opt_d = routine.optimizers()["disc"]

        def sa_step() -> None:
            fake = fake0.clone().requires_grad_(True)
            probs = priors.probabilities((h, w))
            d_out = sa.discriminator_loss(fake, high, probs, None)
            opt_d.zero_grad(set_to_none=True)
            d_out.loss.backward()
            opt_d.step()
            sa.generator_loss(fake, probs).backward()

        probes["SA"] = sa_step
    return probes


# ---------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------
def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    _sync()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync()
    return time.perf_counter() - t0, time.process_time() - c0


def build_skb(device: str = "cpu") -> Any:
    import torch

    from components.registry import create

    skb = create("skb/hrnet-w48-pascal@1", device=device, seed=0)
    skb.to(torch.device(device))
    return skb


def measure(
    model: str,
    variants: list[str],
    warmup: int,
    steps: int,
    shares: bool,
    online_steps: int,
    device: str = "cpu",
    amp: str = "off",
) -> dict[str, Any]:
    """Interleaved rounds over ``variants``; returns per-variant wall/CPU times and component times.

    The online variant ``c`` (minutes per step on CPU) joins only the first ``warmup + online_steps``
    rounds."""
    skb = build_skb(device) if "c" in variants else None
    runners = {v: Runner(model, v, skb, device, amp) for v in variants}
    probes = component_probes(runners["b"]) if shares and "b" in runners else {}
    wall: dict[str, list[float]] = {k: [] for k in [*variants, *probes]}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    metrics: dict[str, dict[str, float]] = {}
    for r in range(warmup + steps):
        for v, runner in runners.items():
            if v == "c" and r >= warmup + online_steps:
                continue
            out: dict[str, float] = {}
            t, c = _timed(lambda runner=runner, out=out: out.update(runner.step()))
            metrics[v] = out
            if r >= warmup:
                wall[v].append(t)
                cpu[v].append(c)
        for name, probe in probes.items():
            t, c = _timed(probe)
            if r >= warmup:
                wall[name].append(t)
                cpu[name].append(c)
        print(
            f"  [{model}] round {r + 1}/{warmup + steps}"
            + ("" if r >= warmup else " (warm-up)")
            + "  "
            + "  ".join(f"{k} {wall[k][-1]:.2f}s" for k in wall if wall[k] and r >= warmup)
            + f"  load {os.getloadavg()[0]:.2f}",
            file=sys.stderr,
            flush=True,
        )
    return {"wall": wall, "cpu": cpu, "metrics": metrics}


def _status_mib(field: str) -> float:
    """``VmHWM``/``VmRSS`` of this process in MiB. Unlike ``ru_maxrss``, which Linux carries over from the
    forking parent, the high-water mark belongs to the exec'd image alone."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_peak(model: str, variant: str) -> dict[str, float]:
    """In a fresh process: build ``variant``, run one step; setup RSS and peak RSS in MiB."""
    skb = build_skb() if variant == "c" else None
    runner = Runner(model, variant, skb)
    setup = _status_mib("VmHWM")
    runner.step()  # the first step allocates everything, Adam state included
    peak = _status_mib("VmHWM")
    return {"setup_mib": setup, "peak_mib": peak, "step_mib": peak - setup}


def peaks(model: str, variants: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--child", f"{model}:{v}", "--threads", str(args.threads)]
        cmd += ["--malloc", args.malloc, "--layout", args.layout, "--sa-precision", args.sa_precision]
        cmd += ["--cpu-kernels", args.cpu_kernels]
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[v] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  [{model}] peak RSS {v}: {out[v]['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def summarise(model: str, raw: dict[str, Any], mem: dict[str, Any]) -> dict[str, Any]:
    wall, cpu = raw["wall"], raw["cpu"]
    med = {k: statistics.median(v) for k, v in wall.items() if v}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items() if v}
    rows = {}
    for v in VARIANTS[model]:
        if v not in med:
            continue
        row: dict[str, Any] = {
            "wall_s": med[v],
            "cpu_s": med_cpu[v],
            "min_wall_s": min(wall[v]),
            "wall_all_s": wall[v],
            "cpu_all_s": cpu[v],
        }
        if "a" in med and v != "a":
            row["ratio_wall"] = med[v] / med["a"]
            row["ratio_cpu"] = med_cpu[v] / med_cpu["a"]
            # least-disturbed step of each side: on a shared machine the fairest estimate
            row["ratio_min_wall"] = min(wall[v]) / min(wall["a"])
            # per-round ratios: both sides measured back to back
            row["ratio_rounds"] = [x / y for x, y in zip(wall[v], wall["a"], strict=False)]
        if v in mem:
            row.update(mem[v])
        rows[v] = row
    parts = {
        k: {"wall_s": med[k], "cpu_s": med_cpu[k], "min_wall_s": min(wall[k])}
        for k in ("SE", "SCH", "SA")
        if k in med
    }
    if "b" in med:
        for p in parts.values():
            p["share_of_b"] = p["wall_s"] / med["b"]
            p["share_of_min_b"] = p["min_wall_s"] / min(wall["b"])
            if "a" in med:
                p["share_of_b_minus_a"] = p["wall_s"] / max(med["b"] - med["a"], 1e-9)
    n, s = MODELS[model]
    out = {"batch": n, "crop": s, "variants": rows, "components_of_b": parts, "last_metrics": raw["metrics"]}
    if {"a", "b", "b-se"} <= med.keys():  # SNR's recipe: SCH on one step in 50
        amortised = (49 * med["b-se"] + med["b"]) / 50
        fastest = (49 * min(wall["b-se"]) + min(wall["b"])) / 50
        out["recipe_amortised"] = {
            "wall_s": amortised,
            "ratio_wall": amortised / med["a"],
            "min_wall_s": fastest,
            "ratio_min_wall": fastest / min(wall["a"]),
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    env = report["env"]
    lines = [
        f"Date {env['date']}, commit {env['commit']}, device {env['device']}, {env['cpu']}, torch {env['torch']}, "
        f"{env['threads']} threads, {env['malloc_desc']}; load average before/after "
        f"{env['load_before']} / {env['load_after']}; {env['warmup']} warm-up + {env['steps']} timed "
        f"rounds ({env['online_steps']} for variant c), variants interleaved; networks "
        f"{env.get('layout', 'auto')} inside; DRBN-SKF discriminator step {env.get('sa_precision', 'fp32')}; "
        f"SE CPU ops {env.get('cpu_kernels', 'eager')}.",
        "",
        "| model (batch x crop) | variant | median step (wall) | CPU time | x plain (wall) | x plain (CPU) "
        "| fastest step | x plain (fastest) | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, res in report["models"].items():
        for v, row in res["variants"].items():
            ratio = f"{row['ratio_wall']:.2f}x" if "ratio_wall" in row else "1.00x"
            ratio_cpu = f"{row['ratio_cpu']:.2f}x" if "ratio_cpu" in row else "1.00x"
            ratio_min = f"{row['ratio_min_wall']:.2f}x" if "ratio_min_wall" in row else "1.00x"
            peak = f"{row['peak_mib'] / 1024:.2f} GiB" if "peak_mib" in row else "-"
            lines.append(
                f"| {model} ({res['batch']}x{res['crop']}²) | {v}: {LABELS[v]} | {row['wall_s']:.2f} s "
                f"| {row['cpu_s']:.2f} s | {ratio} | {ratio_cpu} | {row['min_wall_s']:.2f} s | {ratio_min} "
                f"| {peak} |"
            )
    for model, res in report["models"].items():
        if "recipe_amortised" in res:
            a = res["recipe_amortised"]
            lines.append(
                f"| {model} ({res['batch']}x{res['crop']}²) | recipe step, amortised (49·b-se + b)/50 "
                f"| {a['wall_s']:.2f} s | - | {a['ratio_wall']:.2f}x | - | {a['min_wall_s']:.2f} s "
                f"| {a['ratio_min_wall']:.2f}x | - |"
            )
    lines += [
        "",
        "| model | part of (b), isolated fwd+bwd | median (wall) | fastest | share of (b) (median / fastest) "
        "| share of (b)-(a) |",
        "|---|---|---|---|---|---|",
    ]
    for model, res in report["models"].items():
        for k, p in res["components_of_b"].items():
            lines.append(
                f"| {model} | {k} | {p['wall_s']:.2f} s | {p['min_wall_s']:.2f} s "
                f"| {100 * p.get('share_of_b', 0):.0f}% / {100 * p.get('share_of_min_b', 0):.0f}% "
                f"| {100 * p.get('share_of_b_minus_a', 0):.0f}% |"
            )
    return "\n".join(lines) + "\n"


def _env(args: argparse.Namespace) -> dict[str, Any]:
    import platform

    import torch

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        commit += "+uncommitted" if dirty else ""
    except OSError:
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "cpu": f"{cpu} ({os.cpu_count()} logical CPUs)",
        "torch": torch.__version__,
        "threads": args.threads,
        "malloc": args.malloc,
        "malloc_desc": describe(args.malloc),
        "device": args.device
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + (f", autocast {args.amp}" if args.amp != "off" else ""),
        "warmup": args.warmup,
        "steps": args.steps,
        "online_steps": min(args.online_steps, args.steps),
        "layout": args.layout,
        "sa_precision": _sa_precision(args),
        "cpu_kernels": _cpu_kernels(args),
    }


def _cpu_kernels(args: argparse.Namespace) -> str:
    """Whether the SE blocks ran the fused CPU ops (``components.cpu_kernels``) or eager ones."""
    from components import cpu_kernels

    if args.device != "cpu":
        return "n/a"
    return "compiled" if cpu_kernels.available() else f"eager ({args.cpu_kernels})"


def _sa_precision(args: argparse.Namespace) -> str:
    """``--sa-precision`` and, for ``auto``, what it resolves to on this device."""
    import torch

    from components.losses import resolve_sa_precision

    resolved = resolve_sa_precision(args.sa_precision, torch.device(args.device))
    return args.sa_precision if args.sa_precision != "auto" else f"auto (-> {resolved})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="drbn,snr-net", help="comma list of drbn, snr-net")
    ap.add_argument("--variants", default="a,b,b-nosa,b-se,c", help="comma list of a, b, b-nosa, b-se, c")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds per variant")
    ap.add_argument("--online-steps", type=int, default=2, help="timed rounds of the slow variant c")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", choices=MALLOCS, default="jemalloc")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (then use --malloc glibc; no --memory)")
    ap.add_argument("--amp", choices=("off", "fp16", "bf16"), default="off", help="autocast on CUDA")
    ap.add_argument("--layout", choices=list(LAYOUTS), default="auto", help="networks' memory layout inside")
    ap.add_argument(
        "--sa-precision", choices=SA_PRECISIONS, default="auto", help="DRBN-SKF discriminator step precision"
    )
    ap.add_argument(
        "--cpu-kernels", choices=("auto", "off"), default="auto", help="fused CPU ops of the SE blocks"
    )
    ap.add_argument("--no-shares", action="store_true", help="skip the SE/SCH/SA component timings")
    ap.add_argument("--memory", action="store_true", help="peak RSS per variant in fresh processes")
    ap.add_argument("--json", type=Path, help="write the full report here")
    ap.add_argument("--markdown", type=Path, help="write the markdown tables here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    reexec_with(args.malloc, args.threads)
    LAYOUT["channels_last"] = LAYOUTS[args.layout]
    SA["precision"] = args.sa_precision

    import torch

    torch.set_num_threads(args.threads)
    if args.cpu_kernels == "auto" and args.device == "cpu":
        from components import cpu_kernels

        cpu_kernels.load()
    if args.child:
        model, variant = args.child.split(":")
        print(json.dumps(child_peak(model, variant)))
        return

    env = _env(args)
    env["load_before"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report: dict[str, Any] = {"env": env, "models": {}}
    for model in args.models.split(","):
        if model not in MODELS:
            raise SystemExit(f"unknown model {model!r}; choose from {sorted(MODELS)}")
        variants = [v for v in args.variants.split(",") if v in VARIANTS[model]]
        print(f"{model}: variants {variants}", file=sys.stderr, flush=True)
        raw = measure(
            model,
            variants,
            args.warmup,
            args.steps,
            not args.no_shares,
            min(args.online_steps, args.steps),
            args.device,
            args.amp,
        )
        mem = peaks(model, variants, args) if args.memory else {}
        report["models"][model] = summarise(model, raw, mem)
    env["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = markdown(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
