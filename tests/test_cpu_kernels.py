"""The fused CPU ops of the SE blocks (components.cpu_kernels, models.se.gelu_gate) against eager PyTorch."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import models.se as se
from components import cpu_kernels
from models.se import SemanticEmbedding, _baddbmm_, _bmm, _gelu_times, _matmul, _pointwise, gelu_gate


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    # A C++ compiler and ninja are part of the project's machine setup: failing to build is a failure here.
    assert cpu_kernels.load(), "the fused CPU kernels did not build; see the warning logged above"
    assert cpu_kernels.available()


@pytest.fixture
def eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the registered ops from models.se, as on a bare torch install."""
    monkeypatch.setattr(se, "_cpu_op", lambda name: None)


def _reference(u: torch.Tensor, gate: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(u, approximate=approximate) * gate


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_gelu_gate_matches_eager(approximate: str, dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    # M = 37: not a multiple of any vector width, so the masked tail is exercised; values up to ±6 reach
    # both tails of the GELU
    u = (torch.randn(5, rows, 37, generator=g, dtype=dtype) * 3).requires_grad_(True)
    gate = torch.randn(5, 1, 37, generator=g, dtype=dtype).requires_grad_(True)
    grad = torch.randn(5, rows, 37, generator=g, dtype=dtype)
    out = gelu_gate(u, gate, approximate)
    assert out.grad_fn is not None and "GeluGate" in type(out.grad_fn).__name__  # the fused op ran
    du, dgate = torch.autograd.grad(out, (u, gate), grad)
    ref = _reference(u, gate, approximate)
    rdu, rdgate = torch.autograd.grad(ref, (u, gate), grad)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(du, rdu, **tol)
    torch.testing.assert_close(dgate, rdgate, **tol)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_gate_gradcheck(approximate: str) -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 2, 19, generator=g, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(3, 1, 19, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: gelu_gate(a, b, approximate), (u, gate))


def test_gelu_gate_eager_fallback(eager: None) -> None:
    u = torch.randn(2, 4, 8, requires_grad=True)
    gate = torch.randn(2, 1, 8)
    out = gelu_gate(u, gate)
    assert type(out.grad_fn).__name__ == "MulBackward0"
    torch.testing.assert_close(out, _reference(u, gate, "none"))


def test_gelu_gate_unfusable_inputs_use_eager_ops() -> None:
    u = torch.randn(2, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    out = gelu_gate(u, torch.randn(2, 1, 8, dtype=torch.bfloat16))
    assert type(out.grad_fn).__name__ == "MulBackward0"


def test_gelu_times_fuses_channels_last_maps_only() -> None:
    u = torch.randn(2, 5, 3, 4, requires_grad=True)
    gate = torch.randn(2, 5, 3, 4)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (u, gate)]
    fused = _gelu_times(*cl, "tanh")
    assert fused.is_contiguous(memory_format=torch.channels_last)
    names, todo = set(), [fused.grad_fn]
    while todo:  # the fused op sits under the view and permute back to B×C×H×W
        fn = todo.pop()
        names.add(type(fn).__name__)
        todo += [nxt for nxt, _ in fn.next_functions if nxt is not None]
    assert any("GeluGate" in n for n in names) and "GeluBackward0" not in names
    nchw = _gelu_times(u, gate, "tanh")
    assert type(nchw.grad_fn).__name__ == "MulBackward0"
    torch.testing.assert_close(fused, nchw)


def test_gelu_gate_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="N×F×M"):
        gelu_gate(torch.randn(2, 4, 8), torch.randn(2, 4, 8))


@pytest.mark.parametrize("transpose", [False, True])
def test_onednn_bmm_matches_torch(transpose: bool) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 37, 20, generator=g)
    a = a.transpose(1, 2).contiguous().transpose(1, 2) if transpose else a  # a strided (column-major) operand
    b = torch.randn(3, 20, 11, generator=g)
    torch.testing.assert_close(torch.ops.skf.bmm(a, b), torch.bmm(a, b), rtol=1e-5, atol=1e-5)
    acc = torch.randn(3, 37, 11, generator=g)
    expected = torch.baddbmm(acc, a, b)
    assert _baddbmm_(acc, a, b) is acc  # in place
    torch.testing.assert_close(acc, expected, rtol=1e-5, atol=1e-5)


def test_onednn_bmm_rejects_what_it_does_not_handle() -> None:
    with pytest.raises(RuntimeError, match="float32 only"):
        torch.ops.skf.bmm(
            torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
        )
    with pytest.raises(RuntimeError, match="B x M x K"):
        torch.ops.skf.bmm(torch.randn(2, 3, 4), torch.randn(2, 5, 4))
    # the model-side helpers route what the op does not take to torch.bmm
    a64, b64 = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(_bmm(a64, b64), torch.bmm(a64, b64))


def test_matmul_gradients_match_autograd() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 50, 8, generator=g, requires_grad=True)
    b = torch.randn(2, 8, 8, generator=g, requires_grad=True)
    grad = torch.randn(2, 50, 8, generator=g)
    out = _matmul(a, b)
    assert "BatchedMatmul" in type(out.grad_fn).__name__
    got = torch.autograd.grad(out, (a, b), grad)
    want = torch.autograd.grad(a @ b, (a, b), grad)
    for x, y in zip((out, *got), (a @ b, *want), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("c_in", "c_out"), [(6, 6), (4, 11), (11, 4)])
@pytest.mark.parametrize("with_bmm", [True, False])
def test_pointwise_conv_gradients_match_autograd(
    c_in: int, c_out: int, with_bmm: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not with_bmm:  # the conv-only weight gradient (and, for c_in > c_out, its adjoint form)
        monkeypatch.setattr(se, "_cpu_op", lambda name: None)
    g = torch.Generator().manual_seed(c_in * c_out)
    x = (
        torch.randn(3, c_in, 5, 7, generator=g)
        .contiguous(memory_format=torch.channels_last)
        .requires_grad_(True)
    )
    w = torch.randn(c_out, c_in, 1, 1, generator=g, requires_grad=True)
    grad = torch.randn(3, c_out, 5, 7, generator=g)  # NCHW: the backward must cope with either layout
    out = _pointwise(x, w)
    assert "Conv1x1" in type(out.grad_fn).__name__
    got = torch.autograd.grad(out, (x, w), grad)
    ref = F.conv2d(x, w)
    want = torch.autograd.grad(ref, (x, w), grad)
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pointwise_conv_is_a_plain_conv_outside_training() -> None:
    x = torch.randn(1, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    w = torch.randn(2, 4, 1, 1)
    with torch.no_grad():
        assert _pointwise(x, w.requires_grad_(True)).grad_fn is None
    assert _pointwise(x.contiguous(), w).grad_fn.name().startswith("ConvolutionBackward")  # NCHW input


def _block_pass(block: SemanticEmbedding, x: torch.Tensor, sem: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    out = block(x, sem)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
    return [out.detach(), x.grad] + [p.grad for p in block.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    ("ffn", "gelu", "host", "prior"),
    [
        ("dual-gated", "exact", 32, 8),
        ("dual-gated", "exact", 16, 16),
        ("gdfn", "tanh", 16, 8),
        ("gdfn", "exact", 16, 16),
    ],
)
def test_se_block_fused_equals_eager(
    ffn: str, gelu: str, host: int, prior: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    block = SemanticEmbedding(12, 16, heads=2, ffn=ffn, gelu=gelu)  # type: ignore[arg-type]
    x = torch.randn(2, 16, host, host).contiguous(memory_format=torch.channels_last)
    sem = torch.randn(2, 12, prior, prior)
    fused = _block_pass(block, x, sem)
    monkeypatch.setattr(se, "_cpu_op", lambda name: None)
    reference = _block_pass(block, x, sem)
    assert len(fused) == len(reference) > 5
    for a, b in zip(fused, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_load_failure_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from torch.utils import cpp_extension

    def broken(**kwargs: object) -> None:
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "available", lambda *ops: False)
    monkeypatch.setattr(cpp_extension, "load", broken)
    with caplog.at_level(logging.WARNING, logger="components.cpu_kernels"):
        assert cpu_kernels.load() is False
    assert "c++: command not found" in caplog.text and "eager" in caplog.text
    assert caplog.text.count("unavailable") == len(cpu_kernels.LIBRARIES)  # each library tried on its own


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("SKF_CPU_KERNELS", "off")
    assert cpu_kernels.load() is False


def test_isa_flags() -> None:
    assert "-mavx512f" in cpu_kernels.isa_flags(
        "AVX512"
    ) and "-DCPU_CAPABILITY_AVX512" in cpu_kernels.isa_flags("AVX512")
    assert "-mavx2" in cpu_kernels.isa_flags("AVX2")
    assert cpu_kernels.isa_flags("DEFAULT") == ["-O3", "-fopenmp"]
