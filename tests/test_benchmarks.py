"""The training-step benchmark script (``benchmarks/train_step.py``) on tiny shapes.

The script times minutes of work at the recipe shapes; these tests run its building blocks (the real
routines of every registered family, the interleaved measurement, the component probes, the memory children
and their extrapolation, the report) at batch 2 and 64² crops so a refactor of the engine or the routines
that breaks the benchmark fails here, not on the next measuring day.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """``benchmarks/train_step.py`` as a module (it is a script, not a package member)."""
    spec = importlib.util.spec_from_file_location(
        "skf_train_step_bench", ROOT / "benchmarks" / "train_step.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The benchmark at batch 2 and 64x64 crops (priors then come at 16², 8² and 4²), one thread; every
    family at its recipe's network size except LLFlow-L (24 RRDB blocks, K 12: seconds per tiny step) and
    KinD++ (the MSIA restoration net at full resolution: ~3 s per tiny step), which run their smallest
    networks (``smoke_model``, the same SE slots)."""
    from components.baselines import get_family

    monkeypatch.setattr(bench, "MODELS", {m: (2, 64) for m in bench.family_names()})
    small = {m: dict(get_family(m).smoke_model) for m in ("llflow-l", "kind-pp")}
    monkeypatch.setattr(bench, "MODEL_OVERRIDES", small)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield bench
    torch.set_num_threads(threads)


def _args() -> argparse.Namespace:
    return argparse.Namespace(
        threads=1,
        malloc="glibc",
        device="cpu",
        amp="off",
        warmup=0,
        steps=2,
        online_steps=1,
        layout="auto",
        sa_precision="auto",
        cpu_kernels="auto",
    )


def test_every_registered_family_is_benchmarked(bench: ModuleType) -> None:
    """The script dispatches on the family registry, not on a list of its own; variants follow the recipes."""
    from components.baselines import families

    assert {"drbn", "snr-net", "llflow-s", "llflow-l"} <= set(bench.family_names())
    assert set(bench.family_names()) <= {f.name for f in families()}
    assert bench.variants_of("drbn") == ("a", "b", "b-nosa", "c")  # SA in the recipe
    assert bench.variants_of("snr-net") == ("a", "b", "b-se", "c")  # SCH every 50th step
    assert bench.variants_of("llflow-s") == bench.variants_of("llflow-l") == ("a", "b", "c")
    assert bench.shape("llflow-s") == bench.shape("llflow-l") == (16, 160)  # the recipes' batch and crop
    b = bench.recipe_for("llflow-l", "b")
    assert (b.skf.se, b.skf.sch.enabled, b.skf.sa.enabled, b.skf.skb_mode, b.skf.sch.every) == (
        True,
        True,
        False,
        "cached",
        1,
    )
    assert b.skf.skb_settings == {"input_transform": "log", "bn_mode": "eval"}  # as the recipe trains
    assert bench.recipe_for("llflow-l", "c").skf.skb_mode == "online"
    assert not bench.recipe_for("llflow-s", "a").skf.enabled
    assert bench.final_stage("drbn") is None and bench.display("drbn") == "drbn"


#: the multi-stage families, their final stage (SE blocks, SCH, SA) and its recipe batch and crop (KinD's
#: restore stage sets its own 4 x 384²; RetinexNet's relight and KinD++'s restore fall back to train.*)
STAGED = {
    "retinexnet": ("relight", (16, 64)),
    "kind": ("restore", (4, 384)),
    "kind-pp": ("restore", (10, 64)),
}


def test_staged_families_are_benchmarked_on_their_final_stage(bench: ModuleType) -> None:
    """Multi-stage recipes are timed on the final stage, at its batch and crop, with DRBN's variants (SA)."""
    assert set(STAGED) <= set(bench.family_names())
    for model, (stage, size) in STAGED.items():
        assert bench.final_stage(model).name == stage
        assert bench.shape(model) == bench.recipe_shape(model) == size
        assert bench.display(model) == f"{model}, {stage} stage"
        assert bench.variants_of(model) == ("a", "b", "b-nosa", "c")  # SA on the final stage, as DRBN
        semantics = {}
        for v in ("a", "b", "b-nosa"):
            recipe = bench.recipe_for(model, v)
            semantics[v] = recipe.stage_semantics(recipe.stages[-1])
        assert semantics == {"a": (False, False), "b": (True, True), "b-nosa": (True, False)}


@pytest.mark.parametrize("model", sorted(STAGED))
def test_staged_runner_steps_the_final_stage_and_replays_its_skf_calls(tiny: ModuleType, model: str) -> None:
    """One network per variant, the final stage's routine on it (the earlier sub-networks frozen, as a
    staged run trains them); its SE slots and SCH call (``self.sch(fake, high, labels)``) are recorded and
    replayed by the probes; (b-nosa) drops SA only, (a) has no SKF."""
    runner = tiny.Runner(model, "b", None)
    routine, family = runner.routine, runner.routine.family
    assert runner.stage is routine.stage and routine.stage.name == family.stages[-1].name == STAGED[model][0]
    trained = {n.split(".")[0] for n, p in routine.net.named_parameters() if p.requires_grad}
    assert trained == set(routine.stage.modules)
    optimised = {id(p) for g in runner.ctx.optimizers["net"].param_groups for p in g["params"]}
    assert optimised == {id(p) for p in routine.net.parameters() if p.requires_grad}
    se_calls, sch_call = tiny.record_skf_calls(runner)
    assert {id(c[0]) for c in se_calls} == {id(routine.net.get_submodule(s.path)) for s in family.se_slots}
    assert sch_call is not None
    fake, high, labels = sch_call[0]
    assert fake.requires_grad and not high.requires_grad and fake.shape == high.shape == (2, 3, 64, 64)
    assert labels.shape[-2:] == (64, 64)
    probes = tiny.component_probes(runner)
    assert set(probes) == {"SE", "SCH", "SA"}
    for probe in probes.values():
        probe()
    assert {"sch", "adv", "d_loss"} <= runner.step().keys()
    nosa = tiny.Runner(model, "b-nosa", None)
    assert nosa.routine.sa is None and nosa.routine.sch is not None and "disc" not in nosa.ctx.optimizers
    metrics = nosa.step()
    assert "sch" in metrics and "adv" not in metrics and "d_loss" not in metrics
    plain = tiny.Runner(model, "a", None)
    assert plain.routine.sch is None and plain.routine.sa is None and plain.stage.name == STAGED[model][0]
    assert not plain.recipe.skf.se and "sch" not in plain.step()


def test_extrapolation_is_a_least_squares_line(bench: ModuleType) -> None:
    points = {2: {"peak_mib": 1000.0, "step_mib": 600.0}, 4: {"peak_mib": 1800.0, "step_mib": 1400.0}}
    e = bench.extrapolate(points, 16)
    assert e["peak_mib"] == pytest.approx(6600.0) and e["step_mib"] == pytest.approx(6200.0)
    assert e["peak_per_sample_mib"] == pytest.approx(400.0) and e["from_batches"] == [2, 4]
    assert bench.extrapolate(points, 4) is None and bench.extrapolate({2: points[2]}, 16) is None


@pytest.mark.slow
def test_measurement_and_report_for_every_family(tiny: ModuleType) -> None:
    env = tiny._env(_args())
    env["load_before"] = env["load_after"] = "0.00"  # main() adds these around the measurement
    report = {"env": env, "models": {}}
    for model in tiny.family_names():
        variants = [v for v in tiny.variants_of(model) if v != "c"]  # c: the W48 SKB online, minutes
        raw = tiny.measure(model, variants, warmup=0, steps=2, shares=True, online_steps=1)
        assert set(raw["wall"]) >= set(variants)
        assert {"SE", "SCH"} <= set(raw["wall"])  # every family's (b) step runs SE and SCH
        assert all(len(raw["wall"][v]) == 2 and min(raw["wall"][v]) > 0 for v in variants)
        for v in variants:  # every variant ran real steps with finite losses
            assert raw["metrics"][v] and all(
                torch.isfinite(torch.tensor(x)) for x in raw["metrics"][v].values()
            )
        summary = tiny.summarise(model, raw, {})
        assert summary["batch"] == 2 and summary["crop"] == 64
        assert summary["variants"]["b"]["ratio_wall"] == pytest.approx(
            summary["variants"]["b"]["wall_s"] / summary["variants"]["a"]["wall_s"]
        )
        report["models"][model] = summary
    for model in ("drbn", *STAGED):  # recipes with SA (the staged ones on their final stage)
        assert "SA" in report["models"][model]["components_of_b"]
        assert {"b", "b-nosa"} <= report["models"][model]["variants"].keys()
    for model, (stage, _) in STAGED.items():
        assert report["models"][model]["stage"] == stage
        assert report["models"][model]["batch"] == 2 and report["models"][model]["crop"] == 64
        assert {"sch", "adv", "d_loss"} <= report["models"][model]["last_metrics"]["b"].keys()
        assert "sch" in report["models"][model]["last_metrics"]["b-nosa"]
    assert {"relight_loss", "Ismooth_loss_delta"} <= report["models"]["retinexnet"]["last_metrics"][
        "a"
    ].keys()
    assert report["models"]["drbn"]["stage"] is None
    for model in ("snr-net", "llflow-s", "llflow-l"):
        assert "SA" not in report["models"][model]["components_of_b"]
        assert {"SE", "SCH"} <= report["models"][model]["components_of_b"].keys()
    assert "recipe_amortised" in report["models"]["snr-net"]
    assert "recipe_amortised" not in report["models"]["llflow-s"]  # SCH on every LLFlow step
    assert {"nll", "sch"} <= report["models"]["llflow-s"]["last_metrics"]["b"].keys()
    text = tiny.markdown(report)
    assert "| snr-net (2x64²) | recipe step, amortised (49·b-se + b)/50" in text
    assert "| drbn | SA |" in text
    assert "| llflow-s (2x64²) | b: +SKF, cached priors (= SE+SCH, no SA) |" in text
    assert "| llflow-l | SE |" in text
    assert "| kind, restore stage (2x64²) | b-nosa: +SE+SCH, cached priors (no SA) |" in text
    assert "| retinexnet, relight stage | SA |" in text
    assert "SE CPU ops compiled" in text or "SE CPU ops eager" in text


@pytest.mark.parametrize("model", ["drbn", "snr-net", "llflow-s", "llflow-l", *STAGED])
def test_se_probe_hands_each_block_a_gradient_in_the_networks_layout(tiny: ModuleType, model: str) -> None:
    """The isolated SE timing must see what the step sees: on CPU DRBN and SNR-Net run channels-last, and
    the gradient reaching an SE block from the next layer is channels-last too (LLFlow's conditions are
    NCHW, and so are their gradients). (A scalar loss on the block's output would hand back an NCHW gradient
    and make accumulating the block's own gradients into it several times slower, inflating SNR-Net's SE
    share by ~0.2 s.) The probe replays the step's own SE inputs: the family's slots, shapes and priors."""
    runner = tiny.Runner(model, "b", None)
    probe = tiny.component_probes(runner)["SE"]
    net = runner.routine.net
    blocks = [net.get_submodule(slot.path) for slot in runner.routine.family.se_slots]
    seen: list[tuple[bool, bool]] = []
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def watch(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        shapes.append((tuple(inputs[0].shape), tuple(inputs[1].shape)))
        cl = out.is_contiguous(memory_format=torch.channels_last)
        out.register_hook(lambda g: seen.append((cl, g.is_contiguous(memory_format=torch.channels_last))))

    handles = [b.register_forward_hook(watch) for b in blocks]
    try:
        probe()
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 3 and all(out_cl == grad_cl for out_cl, grad_cl in seen)
    if model in ("drbn", "snr-net"):
        assert seen == [(True, True)] * 3
    if model.startswith("llflow"):  # conditions at 1/8, 1/4, 1/2; F0 (1/4) reaches the 1/8 block as cached
        assert [(x[-1], sem[-2:]) for x, sem in shapes] == [(8, (16, 16)), (16, (8, 8)), (32, (4, 4))]


@pytest.mark.slow
def test_memory_children_and_extrapolation_from_the_command_line(tmp_path: Path) -> None:
    """``--no-timing --memory --memory-batches``: one fresh process per batch, VmHWM reset before the step,
    a labelled linear extrapolation to the recipe batch (16 for LLFlow-S), the report written."""
    out = tmp_path / "mem.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "train_step.py"),
        "--models",
        "llflow-s",
        "--variants",
        "b",
    ]
    cmd += ["--no-timing", "--memory", "--memory-batches", "1,2", "--crop", "64", "--threads", "1"]
    cmd += ["--malloc", "glibc", "--cpu-kernels", "off", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mem = json.loads(out.read_text())["models"]["llflow-s"]["memory"]
    assert set(mem["measured"]) == {"1", "2"} and mem["recipe_batch"] == 16
    rows = [mem["measured"][b]["b"] for b in ("1", "2")]
    assert all(r["peak_mib"] >= r["rss_before_mib"] > 0 and r["step_s"] > 0 and r["crop"] == 64 for r in rows)
    assert (
        mem["extrapolated"]["b"]["batch"] == 16 and mem["extrapolated"]["b"]["kind"] == "linear extrapolation"
    )
    assert "**linear extrapolation** from batches 1, 2, not measured" in proc.stdout


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_in_smoke_mode(tmp_path: Path) -> None:
    """``benchmarks/gpu_check.sh --smoke``: the GPU session's command, on CPU at toy sizes, writes every
    result file (eager and compiled step ratios, precompute throughput, data wait); what only CUDA can run it leaves out."""
    out = tmp_path / "results"
    env = {**os.environ, "SKF_GPU_CHECK_OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "data-wait-snr-net-skf.json",
        "precompute.json",
        "step-compiled.json",
        "step-compiled.md",
        "step-eager.json",
        "step-eager.md",
    ]
    eager, compiled = (json.loads((out / f"step-{k}.json").read_text()) for k in ("eager", "compiled"))
    assert (eager["env"]["compile"], compiled["env"]["compile"]) == ("off", "default")
    assert set(eager["models"]["drbn"]["variants"]) == {"a", "b", "b-nosa"}
    assert set(compiled["models"]["drbn"]["variants"]) == {"a"}  # smoke: the plain step compiled only
    assert json.loads((out / "precompute.json").read_text())
    wait = json.loads((out / "data-wait-snr-net-skf.json").read_text())
    assert 0.0 <= wait["data_wait_share"] <= 1.0 and wait["steps"] == 4 and wait["num_workers"] == 0
    assert "done:" in proc.stdout
