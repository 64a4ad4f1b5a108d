"""Benchmark: cost of SKF on one real training step (forward, backward, optimiser) on CPU.

For every registered baseline family (``components.baselines.families()``: DRBN, SNR-Net, LLFlow-S,
LLFlow-L, RetinexNet, KinD, KinD++, HWMNet), at the recipe's batch and crop (DRBN 4 x 256², SNR-Net
16 x 128², LLFlow 16 x 160²; ``--batch`` and ``--crop`` scale them down), the family's training routine
(``family.routine``, e.g. :class:`~components.baselines.drbn.DRBNRoutine`, ``LLFlowRoutine``) is timed
through the engine's :class:`~components.training.engine.StepContext`. A multi-stage recipe (``stages:``) is timed on its
**final stage** only, the one with the SE blocks and the semantic losses (RetinexNet's relight, KinD's and
KinD++'s restore): the network is built once per variant and the routine for ``recipe.stages[-1]`` runs on
it (earlier sub-networks frozen, as in a staged run), at that stage's batch and crop (``stage.batch_size``
/ ``crop``, else ``train.*``: RetinexNet 16 x 64², KinD 4 x 384², KinD++ 10 x 64²). The variants:

* ``a``  plain baseline (recipe ``<family>``);
* ``b``  baseline + SKF with cached priors (recipe ``<family>-skf`` with ``skb_mode=cached``,
  ``skb_input=lq``; random fp16 maps shaped like the prior cache's crop output; no HRNet runs; SCH on every
  timed step). For families whose recipe has no SA (SNR-Net, LLFlow) this is the SE + SCH step;
* ``b-nosa`` (recipes with SA: DRBN, RetinexNet, KinD, KinD++) ``b`` without SA: the SE + SCH part of the step;
* ``b-se`` (recipes with SCH every n > 1 steps: SNR-Net) ``b`` on the recipe's steps without SCH (n - 1 of
  n); with ``b`` it gives the recipe's amortised SKF step ``((n - 1)·b-se + b) / n``;
* ``c``  baseline + SKF with the HRNet-W48 SKB online (random init, built with the recipe's
  ``skf.skb_settings``; DRBN: on r3 and on the output, as released; the others: on the low-light crop).

Inputs the family computes from the whole low image before cropping (``family.input_features()``, LLFlow's
histogram-equalised copy) are computed on the crop and put in the batch, as the data loader would. The step
runs in fp32 on CPU whatever the recipe's ``train.precision`` (the LLFlow recipes train with AMP on CUDA).

Variants are interleaved round by round (a, b, ..., a, b, ...) in one process so load drift hits both
sides of a ratio. Each round also times the SE blocks, the SCH loss and the SA losses of ``b`` in
isolation (forward + backward, SA incl. the D optimiser step) for the component shares: one untimed step of
``b`` records what the step hands the family's SE slots (``family.se_slots``) and SCH (shapes, layouts,
values, which inputs carry gradients), and the probes replay exactly those calls. With ``--memory`` every
variant is re-run in a fresh child process for its peak RSS (``VmHWM``, reset right before the step through
``/proc/self/clear_refs``), at the timed batch or at each of ``--memory-batches`` (then, when the recipe
batch is not among them, a linear extrapolation to it is reported as such); ``--no-timing`` measures memory
only. ``--layout`` picks the networks' internal memory layout for every variant whose network has the
option (DRBN, SNR-Net; default ``auto``: as built, channels-last on CPU and NCHW on CUDA); ``--sa-precision``
the DRBN-SKF discriminator step's (recipe ``skf.sa.precision``, default ``auto``: bf16 autocast where the
device has native bf16, e.g. an AVX512-BF16 CPU); ``--cpu-kernels`` whether the SE blocks' fused CPU ops are
built and used (default ``auto``, as the training engine does on CPU; ``off`` keeps the eager ops).

    python benchmarks/train_step.py --models drbn,snr-net --threads 2 --malloc jemalloc --memory \\
        --json bench.json --markdown bench.md
    python benchmarks/train_step.py --models snr-net --variants a,b --steps 3
    python benchmarks/train_step.py --models llflow-s --variants a,b --threads 1 --memory
    python benchmarks/train_step.py --models retinexnet,kind-pp --variants a,b,b-nosa --threads 1
    python benchmarks/train_step.py --models llflow-l --variants b --no-timing --memory \\
        --memory-batches 2,4 --threads 1     # the recipe batch (16 x 160²) needs ~30 GB on CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
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

#: (batch, crop) per family for this run; a family not listed runs at its recipe's (``shape``).
MODELS: dict[str, tuple[int, int]] = {}
#: ``model.*`` overrides per family for this run (the tests use the families' ``smoke_model``).
MODEL_OVERRIDES: dict[str, dict[str, Any]] = {}
LAYOUTS = {"auto": None, "channels-last": True, "nchw": False}
#: The networks' internal layout for this run (``--layout``); the builders' ``channels_last`` override.
LAYOUT: dict[str, bool | None] = {"channels_last": None}
#: torch.compile mode of the trained networks for this run (``--compile``), as the engine's ``compile``.
COMPILE: dict[str, str] = {"mode": "off"}
SA_PRECISIONS = ("auto", "fp32", "bf16")
#: The DRBN-SKF discriminator step's precision for this run (``--sa-precision``; recipe ``skf.sa.precision``).
SA: dict[str, str] = {"precision": "auto"}
ALL_VARIANTS = ("a", "b", "b-nosa", "b-se", "c")
LABELS = {
    "a": "plain baseline",
    "b": "+SKF, cached priors",
    "b-nosa": "+SE+SCH, cached priors (no SA)",
    "b-se": "+SE only, cached priors (the recipe's steps without SCH)",
    "c": "+SKF, W48 SKB online",
}
#: what the prior cache delivers for a crop: fp16 maps (channels, stride) of the SKF SKBs
PRIOR_SHAPES = {"f0": (48, 4), "f1": (96, 8), "f2": (192, 16), "logits": (59, 4)}


# ---------------------------------------------------------------------------------------------------
# Building the real routines
# ---------------------------------------------------------------------------------------------------
def family_names() -> list[str]:
    """The registered families that ship both recipes the variants need (``<family>``, ``<family>-skf``)."""
    from components.baselines import families
    from components.recipes import available_recipes

    recipes = set(available_recipes())
    return [f.name for f in families() if {f.name, f"{f.name}-skf"} <= recipes]


def skf_recipe(model: str) -> Any:
    """The family's shipped SKF recipe (``<family>-skf``)."""
    from components.recipes import load_recipe

    return load_recipe(f"{model}-skf")


def final_stage(model: str) -> Any:
    """The stage a multi-stage recipe is timed on (its last: the SE blocks and semantic losses), else None."""
    from components.recipes import load_recipe

    stages = load_recipe(model).stages
    return stages[-1] if stages else None


def recipe_shape(model: str) -> tuple[int, int]:
    """(batch, crop) the recipe trains the timed step at: the final stage's, falling back to ``train.*``."""
    from components.recipes import load_recipe

    train, stage = load_recipe(model).train, final_stage(model)
    batch = (stage.batch_size if stage is not None else None) or train.batch_size
    crop = (stage.crop if stage is not None else None) or train.crop
    return int(batch), int(crop)


def shape(model: str) -> tuple[int, int]:
    """(batch, crop) of this run: ``MODELS``' entry, else :func:`recipe_shape`."""
    if model in MODELS:
        return MODELS[model]
    return recipe_shape(model)


def display(model: str) -> str:
    """``model`` as the report names it: staged families with the timed stage (``kind, restore stage``)."""
    stage = final_stage(model)
    return model if stage is None else f"{model}, {stage.name} stage"


def variants_of(model: str) -> tuple[str, ...]:
    """The variants that exist for ``model``: ``b-nosa`` where its SKF recipe has SA, ``b-se`` where SCH
    runs every n > 1 steps."""
    skf = skf_recipe(model).skf
    out = ["a", "b"]
    if skf.sa.enabled:
        out.append("b-nosa")
    if skf.sch.enabled and skf.sch.every > 1:
        out.append("b-se")
    return (*out, "c")


def label(model: str, variant: str) -> str:
    if variant == "b" and not skf_recipe(model).skf.sa.enabled:
        return LABELS["b"] + " (= SE+SCH, no SA)"
    return LABELS[variant]


def _model_overrides(model: str) -> dict[str, Any]:
    from components.baselines import get_family

    over = dict(MODEL_OVERRIDES.get(model, {}))
    if "channels_last" in inspect.signature(get_family(model).network).parameters:
        over.update(LAYOUT)
    return over


def recipe_for(model: str, variant: str) -> Any:
    from components.recipes import load_recipe

    over: dict[str, Any] = {"model": _model_overrides(model)}
    if variant == "a":
        return load_recipe(model, over)
    shipped = skf_recipe(model).skf
    if variant == "c":  # the shipped SKF recipe with its SKB online (DRBN: on r3 and the output, as released)
        skf: dict[str, Any] = {"skb_mode": "online"}
    else:
        skf = {"skb_mode": "cached", "skb_input": "lq"}
    if shipped.sch.enabled:
        # SCH on every timed step (SNR's every-50th-step worst case); b-se: the recipe's schedule, which
        # the few timed steps (1, 2, ...) never reach
        skf["sch"] = {"every": shipped.sch.every if variant == "b-se" else 1}
    if shipped.sa.enabled:
        skf["sa"] = {"enabled": False} if variant == "b-nosa" else {"precision": SA["precision"]}
    over["skf"] = skf
    return load_recipe(f"{model}-skf", over)


def make_batch(model: str, variant: str, seed: int = 0) -> dict[str, Any]:
    import torch

    from components.baselines import get_family

    n, s = shape(model)
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, Any] = {
        "low": torch.rand(n, 3, s, s, generator=g) * 0.3,
        "high": torch.rand(n, 3, s, s, generator=g),
    }
    # what the dataset adds from the low image (LLFlow: histeq), HWC uint8 in, CHW float in [0, 1] out
    low_u8 = (batch["low"] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for name, fn in get_family(model).input_features().items():
        maps = [torch.from_numpy(fn(img)) for img in low_u8]
        batch[name] = torch.stack([m.permute(2, 0, 1) if m.ndim == 3 else m for m in maps]).float() / 255.0
    if variant.startswith("b"):  # what PriorsLoader delivers for a crop: fp16 maps at 1/4, 1/8, 1/16
        batch["priors"] = {
            k: (torch.randn(n, c, s // st, s // st, generator=g) * (3.0 if k == "logits" else 1.0)).half()
            for k, (c, st) in PRIOR_SHAPES.items()
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
        # multi-stage recipes: the final stage's routine over the whole network (the others frozen)
        self.stage = self.recipe.stages[-1] if self.recipe.stages else None
        self.routine = build_routine(
            None,
            self.recipe,
            skb if variant == "c" else None,
            stage=self.stage,
            net=self.recipe.build_model(),
        )
        modules = self.routine.modules()
        for m in modules.values():
            m.to(self.device).train()  # before the optimisers: they keep the same Parameter objects
            if COMPILE["mode"] != "off":
                m.compile(mode=COMPILE["mode"], dynamic=False)  # as the engine does (train.compile)
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
def _leaf(x: Any) -> Any:
    """A fresh copy of a recorded call argument: same values and strides, a gradient leaf if it had one."""
    import torch

    if not isinstance(x, torch.Tensor):
        return x
    return x.detach().clone().requires_grad_(x.requires_grad)


def record_skf_calls(runner: Runner) -> tuple[list[tuple[Any, ...]], tuple[Any, ...] | None]:
    """One step of ``runner`` with hooks on the family's SE slots and on SCH: every SE call as
    ``(block, args, kwargs, output)`` and the SCH call as ``(args, kwargs)`` (``None`` if SCH did not run),
    tensors detached."""
    import torch

    routine = runner.routine
    net = routine.net
    se_calls: list[tuple[Any, ...]] = []
    sch_call: list[tuple[Any, ...]] = []

    def detached(xs: Any) -> Any:
        if isinstance(xs, dict):
            return {k: detached(v) for k, v in xs.items()}
        if isinstance(xs, tuple | list):
            return type(xs)(detached(v) for v in xs)
        if isinstance(xs, torch.Tensor):
            return xs.detach().clone().requires_grad_(xs.requires_grad)
        return xs

    def on_se(block: Any, args: Any, kwargs: Any, out: Any) -> None:
        se_calls.append((block, detached(args), detached(kwargs), out.detach()))

    def on_sch(_m: Any, args: Any, kwargs: Any) -> None:
        sch_call.append((detached(args), detached(kwargs)))

    handles = [
        net.get_submodule(slot.path).register_forward_hook(on_se, with_kwargs=True)
        for slot in routine.family.se_slots
    ]
    if routine.sch is not None:
        handles.append(routine.sch.register_forward_pre_hook(on_sch, with_kwargs=True))
    try:
        runner.step()
    finally:
        for h in handles:
            h.remove()
    return se_calls, (sch_call[0] if sch_call else None)


def component_probes(runner: Runner) -> dict[str, Callable[[], None]]:
    """Forward + backward of each SKF part of ``runner``'s step, on the step's own inputs and modules.

    The SE blocks (``family.se_slots``) and SCH are replayed with what one recorded step handed them; each
    SE output gets a fixed random upstream gradient in the output's own layout (a scalar loss such as
    ``out.square().mean()`` would hand back an NCHW gradient, and accumulating a channels-last block's
    gradients into it costs ~0.2 s per SNR-Net step that the real step never pays)."""
    import torch

    from components.skb import Priors

    routine, batch, device = runner.routine, runner.batch, runner.device
    se_calls, sch_call = record_skf_calls(runner)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.empty_like(out, device="cpu").normal_(generator=g).to(device) for *_, out in se_calls]

    def se() -> None:
        outs = []
        for block, args, kwargs, _ in se_calls:
            outs.append(block(*[_leaf(a) for a in args], **{k: _leaf(v) for k, v in kwargs.items()}))
        torch.autograd.backward(outs, upstream)

    probes: dict[str, Callable[[], None]] = {"SE": se} if se_calls else {}
    if sch_call is not None:
        sch_args, sch_kwargs = sch_call

        def sch() -> None:
            routine.sch(
                *[_leaf(a) for a in sch_args], **{k: _leaf(v) for k, v in sch_kwargs.items()}
            ).backward()

        probes["SCH"] = sch
    sa = getattr(routine, "sa", None)
    if sa is not None:
        priors = Priors(**{k: v.float() for k, v in batch["priors"].items()})
        high = batch["high"]
        n, _, h, w = high.shape
        fake0 = torch.rand(n, 3, h, w, generator=g).to(device)
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


def build_skb(device: str = "cpu", settings: dict[str, Any] | None = None) -> Any:
    """The random-init HRNet-W48 SKB with the recipe's ``skf.skb_settings`` (LLFlow: log input)."""
    import torch

    from components.registry import create

    skb = create("skb/hrnet-w48-pascal@1", device=device, seed=0, **(settings or {}))
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
    skb = build_skb(device, recipe_for(model, "c").skf.skb_settings) if "c" in variants else None
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


def _reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (``/proc/self/clear_refs``, Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child_peak(model: str, variant: str) -> dict[str, Any]:
    """In a fresh process: build ``variant``, run one step; RSS in MiB before it and at its peak.

    ``setup_mib`` is the high-water mark of building (network, optimiser, batch); the mark is then reset to
    the resting RSS (``rss_before_mib``) so ``peak_mib`` is the step's own peak, and ``step_mib`` what one
    step (forward, backward, optimiser incl. Adam's first-step state) adds on top of the resting RSS."""
    skb = build_skb("cpu", recipe_for(model, "c").skf.skb_settings) if variant == "c" else None
    runner = Runner(model, variant, skb)
    setup = _status_mib("VmHWM")
    before = _status_mib("VmRSS")
    reset = _reset_hwm()
    t0 = time.perf_counter()
    runner.step()  # the first step allocates everything, Adam state included
    seconds = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    base = before if reset else setup
    n, s = shape(model)
    return {
        "batch": n,
        "crop": s,
        "setup_mib": setup,
        "rss_before_mib": before,
        "peak_mib": peak,
        "step_mib": peak - base,
        "hwm_reset": reset,
        "step_s": seconds,
    }


def peaks(
    model: str, variants: list[str], args: argparse.Namespace, batch: int | None = None
) -> dict[str, dict[str, Any]]:
    """:func:`child_peak` of each variant in its own process, at ``batch`` (default: this run's)."""
    n, s = shape(model)
    out = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--child", f"{model}:{v}", "--threads", str(args.threads)]
        cmd += ["--malloc", args.malloc, "--layout", args.layout, "--sa-precision", args.sa_precision]
        cmd += ["--compile", args.compile]
        cmd += ["--cpu-kernels", args.cpu_kernels, "--batch", str(batch or n), "--crop", str(s)]
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[v] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"  [{model}] {out[v]['batch']}x{s}² peak RSS {v}: {out[v]['peak_mib']:.0f} MiB "
            f"(step +{out[v]['step_mib']:.0f} MiB, {out[v]['step_s']:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    return out


def extrapolate(points: dict[int, dict[str, Any]], target: int) -> dict[str, Any] | None:
    """Least-squares line through (batch, peak) and (batch, step increase) of >= 2 batches, at ``target``."""
    if len(points) < 2 or target in points:
        return None
    xs = sorted(points)
    out: dict[str, Any] = {"batch": target, "from_batches": xs, "kind": "linear extrapolation"}
    for key in ("peak_mib", "step_mib"):
        ys = [points[x][key] for x in xs]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        out[key] = my + slope * (target - mx)
        out[key.replace("_mib", "_per_sample_mib")] = slope
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def summarise(
    model: str,
    raw: dict[str, Any] | None,
    mem: dict[str, Any],
    mem_batches: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Medians, ratios to (a), component shares; ``mem``: peaks at the timed batch, ``mem_batches``: peaks
    at other batches (``{batch: {variant: row}}``) with the linear extrapolation to the recipe batch."""
    raw = raw or {"wall": {}, "cpu": {}, "metrics": {}}
    wall, cpu = raw["wall"], raw["cpu"]
    med = {k: statistics.median(v) for k, v in wall.items() if v}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items() if v}
    rows = {}
    for v in variants_of(model):
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
            if "a" in med and med["b"] > med["a"]:  # undefined when noise puts (b) at or below (a)
                p["share_of_b_minus_a"] = p["wall_s"] / (med["b"] - med["a"])
    n, s = shape(model)
    stage = final_stage(model)
    out: dict[str, Any] = {
        "batch": n,
        "crop": s,
        "stage": stage.name if stage is not None else None,
        "variants": rows,
        "components_of_b": parts,
        "last_metrics": raw["metrics"],
    }
    every = skf_recipe(model).skf.sch.every
    if {"a", "b", "b-se"} <= med.keys():  # SNR's recipe: SCH on one step in 50
        amortised = ((every - 1) * med["b-se"] + med["b"]) / every
        fastest = ((every - 1) * min(wall["b-se"]) + min(wall["b"])) / every
        out["recipe_amortised"] = {
            "every": every,
            "wall_s": amortised,
            "ratio_wall": amortised / med["a"],
            "min_wall_s": fastest,
            "ratio_min_wall": fastest / min(wall["a"]),
        }
    if mem_batches:
        recipe_batch = recipe_shape(model)[0]
        out["memory"] = {
            "recipe_batch": recipe_batch,
            "measured": {str(k): v for k, v in sorted(mem_batches.items())},
            "extrapolated": {
                v: e
                for v in sorted({v for rows_ in mem_batches.values() for v in rows_})
                if (e := extrapolate({k: r[v] for k, r in mem_batches.items() if v in r}, recipe_batch))
            },
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    env = report["env"]
    lines = [
        f"Date {env['date']}, commit {env['commit']}, device {env['device']}, {env['cpu']}, torch {env['torch']}, "
        f"{env['threads']} threads, {env['malloc_desc']}; load average before/after "
        f"{env['load_before']} / {env['load_after']}; "
        + (
            "no timed rounds (memory only); "
            if env.get("no_timing")
            else f"{env['warmup']} warm-up + {env['steps']} timed rounds ({env['online_steps']} for variant c), "
            "variants interleaved; "
        )
        + "networks "
        f"{env.get('layout', 'auto')} inside (where the network has the option); DRBN-SKF discriminator "
        f"step {env.get('sa_precision', 'fp32')}; SE CPU ops {env.get('cpu_kernels', 'eager')}; "
        f"{env.get('precision', 'fp32')}.",
    ]
    timed = any(res["variants"] for res in report["models"].values())
    if timed:
        lines += [
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
                f"| {display(model)} ({res['batch']}x{res['crop']}²) | {v}: {label(model, v)} | {row['wall_s']:.2f} s "
                f"| {row['cpu_s']:.2f} s | {ratio} | {ratio_cpu} | {row['min_wall_s']:.2f} s | {ratio_min} "
                f"| {peak} |"
            )
    for model, res in report["models"].items():
        if "recipe_amortised" in res:
            a = res["recipe_amortised"]
            n = a.get("every", 50)
            lines.append(
                f"| {display(model)} ({res['batch']}x{res['crop']}²) | recipe step, amortised ({n - 1}·b-se + b)/{n} "
                f"| {a['wall_s']:.2f} s | - | {a['ratio_wall']:.2f}x | - | {a['min_wall_s']:.2f} s "
                f"| {a['ratio_min_wall']:.2f}x | - |"
            )
    if any(res["components_of_b"] for res in report["models"].values()):
        lines += [
            "",
            "| model | part of (b), isolated fwd+bwd | median (wall) | fastest | share of (b) (median / fastest) "
            "| share of (b)-(a) |",
            "|---|---|---|---|---|---|",
        ]
    for model, res in report["models"].items():
        for k, p in res["components_of_b"].items():
            lines.append(
                f"| {display(model)} | {k} | {p['wall_s']:.2f} s | {p['min_wall_s']:.2f} s "
                f"| {100 * p.get('share_of_b', 0):.0f}% / {100 * p.get('share_of_min_b', 0):.0f}% "
                + (f"| {100 * p['share_of_b_minus_a']:.0f}% |" if "share_of_b_minus_a" in p else "| - |")
            )
    mem_rows = []
    for model, res in report["models"].items():
        mem = res.get("memory")
        if not mem:
            continue
        for batch, per_variant in mem["measured"].items():
            for v, r in per_variant.items():
                note = "" if r.get("hwm_reset", False) else "; VmHWM not reset (peak incl. setup)"
                mem_rows.append(
                    f"| {display(model)} | {v} | {batch}x{r['crop']}² (measured) | {r['rss_before_mib'] / 1024:.2f} GiB "
                    f"| {r['peak_mib'] / 1024:.2f} GiB | {r['step_mib'] / 1024:.2f} GiB | {r['step_s']:.1f} s{note} |"
                )
        for v, e in mem["extrapolated"].items():
            mem_rows.append(
                f"| {display(model)} | {v} | {e['batch']}x{res['crop']}² (recipe batch; **linear extrapolation** from batches "
                f"{', '.join(map(str, e['from_batches']))}, not measured) | - | ~{e['peak_mib'] / 1024:.1f} GiB "
                f"| ~{e['step_mib'] / 1024:.1f} GiB | {e['step_per_sample_mib']:.0f} MiB per sample |"
            )
    if mem_rows:
        lines += [
            "",
            "| model | variant | batch x crop | RSS before the step | peak RSS of the step | step increase "
            "| first step / note |",
            "|---|---|---|---|---|---|---|",
            *mem_rows,
        ]
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
        "no_timing": bool(getattr(args, "no_timing", False)),
        "layout": args.layout,
        "compile": getattr(args, "compile", "off"),
        "sa_precision": _sa_precision(args),
        "cpu_kernels": _cpu_kernels(args),
        # the steps run without autocast on CPU (the LLFlow recipes' AMP applies on CUDA only)
        "precision": f"autocast {args.amp}" if args.device != "cpu" and args.amp != "off" else "fp32",
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
    ap.add_argument(
        "--models", default="", help="comma list of baseline families (default: every registered one)"
    )
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS), help="comma list of a, b, b-nosa, b-se, c")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds per variant")
    ap.add_argument("--online-steps", type=int, default=2, help="timed rounds of the slow variant c")
    ap.add_argument("--batch", type=int, default=None, help="batch size instead of the recipe's (scale-down)")
    ap.add_argument("--crop", type=int, default=None, help="crop instead of the recipe's")
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
    ap.add_argument(
        "--compile",
        choices=("off", "default", "reduce-overhead", "max-autotune"),
        default="off",
        help="torch.compile the trained networks (the engine's compile setting)",
    )
    ap.add_argument("--no-shares", action="store_true", help="skip the SE/SCH/SA component timings")
    ap.add_argument("--no-timing", action="store_true", help="no timed rounds (memory only, with --memory)")
    ap.add_argument("--memory", action="store_true", help="peak RSS per variant in fresh processes")
    ap.add_argument(
        "--memory-batches",
        default="",
        help="comma list of batch sizes for --memory (default: the timed batch); with two or more and not the "
        "recipe batch, a linear extrapolation to the recipe batch is added",
    )
    ap.add_argument("--json", type=Path, help="write the full report here")
    ap.add_argument("--markdown", type=Path, help="write the markdown tables here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    reexec_with(args.malloc, args.threads)
    LAYOUT["channels_last"] = LAYOUTS[args.layout]
    SA["precision"] = args.sa_precision
    COMPILE["mode"] = args.compile

    import torch

    torch.set_num_threads(args.threads)
    known = family_names()
    models = [m for m in args.models.split(",") if m] or known
    for model in models if not args.child else [args.child.split(":")[0]]:
        if model not in known:
            raise SystemExit(f"unknown model {model!r}; choose from {known}")
        if args.batch or args.crop:
            n, s = shape(model)
            MODELS[model] = (args.batch or n, args.crop or s)
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
    mem_batches = [int(b) for b in args.memory_batches.split(",") if b]
    for model in models:
        variants = [v for v in args.variants.split(",") if v in variants_of(model)]
        print(f"{display(model)} {shape(model)}: variants {variants}", file=sys.stderr, flush=True)
        raw = None
        if not args.no_timing:
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
        mem: dict[str, Any] = {}
        by_batch: dict[int, dict[str, Any]] = {}
        if args.memory:
            timed_batch = shape(model)[0]
            for n in mem_batches or [timed_batch]:
                by_batch[n] = peaks(model, variants, args, n)
            mem = by_batch.get(timed_batch, {}) if raw is not None else {}
        report["models"][model] = summarise(model, raw, mem, by_batch)
    env["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = markdown(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
