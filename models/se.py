"""SE: the Semantic-aware Embedding module of SKF (channel-transposed cross-attention, docs/method.md §3).

Image features ``R`` (B×C×h×w) attend to semantic features ``S`` (B×Cs×hs×ws) across *channels*
(Restormer MDTA style): the query comes from the semantics, key and value from the image. Sub-module and
parameter names mirror the official ``TransformerBlock`` / ``TransformerBlock_1`` so the released SNR-,
DRBN- and LLFlow-SKF checkpoints load with ``strict=True``:

``conv1`` (Cs→C, bias), ``norm1.body.{weight,bias}``, ``attn.{temperature,kv,kv_dwconv,q,q_dwconv,
project_out}``, ``norm2.body.*``, ``ffn.*`` and, for the bottleneck variant, ``conv2``/``conv3``.

Speed (same results, see ``tests/test_se.py``): the priors reach a host feature by *nearest* upsampling by
an integer factor ``f`` (×4 in SNR, ×2 in DRBN), so the semantic branch is piecewise constant on f×f
blocks. Everything per-pixel on it (``conv1``, ``norm1``, ``q``, ``norm2``, ``project_in_S``, GELU) runs at
the prior's resolution, and the full 3×3 ``q_dwconv`` of the upsampled map is rewritten exactly as a
3×3 conv at low resolution with one collapsed kernel per *phase class* (first / interior / last row and
column of a block, :func:`_phase_classes`). The query never exists at full resolution: its Gram product
with the key only needs the key summed over each phase class (small membership matmuls), and that
normalised product has a hand-written backward (:class:`_ChannelCosine`); ``project_out`` folds into the
attention matrix. The block runs channels-last inside, where the per-pixel LayerNorm needs no
transposing copies.

On CPU, three ops run through ``torch.ops.skf.*`` once ``components.cpu_kernels`` has built and registered
them (first use, with the machine's compiler), and as the equivalent eager ops otherwise (and always for
CUDA, half precision, tracing, export and ``torch.compile``): the feed-forward's GELU gate as one fused pass
each way (:func:`gelu_gate`), the attention's batched fp32 matmuls through oneDNN instead of MKL
(:func:`_bmm`), and with them the 1×1 convs' weight gradients (:class:`_Conv1x1`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from models.padding import exporting

FFNKind = Literal["gdfn", "dual-gated"]
GeluKind = Literal["exact", "tanh"]
#: Builds one SE block for a host: ``(sem_channels, channels) -> module`` taking ``(x, sem)``.
SEFactory = Callable[[int, int], nn.Module]

__all__ = [
    "SEFactory",
    "ChannelLayerNorm",
    "DualGatedFeedForward",
    "GatedDConvFeedForward",
    "SemanticEmbedding",
    "SemanticEmbeddingBottleneck",
    "TransposedCrossAttention",
    "gelu_gate",
]


def _gelu_approximate(kind: GeluKind) -> str:
    """Map our GELU name to ``F.gelu``'s ``approximate`` argument (a string keeps modules picklable)."""
    if kind not in ("exact", "tanh"):
        raise ValueError(f"gelu must be 'exact' or 'tanh', got {kind!r}")
    return "none" if kind == "exact" else "tanh"


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 -> fp32 for numerically sensitive steps; fp32/fp64 unchanged."""
    return torch.promote_types(dtype, torch.float32)


class ChannelLayerNorm(nn.Module):
    """Per-pixel LayerNorm over channels of a B×C×H×W map (biased variance, eps 1e-5).

    The parameters live in ``body`` (an ``nn.LayerNorm``) to match the official ``norm*.body.*`` keys.
    Statistics are computed in fp32 so the block is safe under fp16/bf16 autocast.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.body = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        dtype = _at_least_fp32(x.dtype)
        y = F.layer_norm(
            x.permute(0, 2, 3, 1).to(dtype),
            self.body.normalized_shape,
            self.body.weight.to(dtype),
            self.body.bias.to(dtype),
            self.body.eps,
        )
        return y.permute(0, 3, 1, 2).to(x.dtype)


@functools.lru_cache(maxsize=16)
def _phase_classes(factor: int) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, int, int], ...]]:
    """Group the ``factor`` phases of a nearest-upsampled axis by where a 3-tap kernel reads.

    Output row ``f·i + a`` of a 3×3 conv (padding 1) on a map upsampled by ``f`` reads source rows
    ``⌊(f·i + a + t - 1) / f⌋ = i + o`` for taps ``t = 0, 1, 2``; phases with the same offsets ``o`` form
    one class (for ``f ≥ 3``: the first phase, the interior ones, the last; ``f = 2``: first, last;
    ``f = 1``: one class, the plain conv). Returns (the phases of each class, the offsets of each class).
    """
    classes: dict[tuple[int, int, int], list[int]] = {}
    for a in range(factor):
        offsets = tuple((a + t - 1) // factor for t in range(3))
        classes.setdefault(offsets, []).append(a)  # type: ignore[arg-type]
    return tuple(tuple(v) for v in classes.values()), tuple(classes)  # type: ignore[return-value]


@functools.lru_cache(maxsize=16)
def _phase_tables(factor: int) -> tuple[list[list[list[float]]], list[list[float]], list[float]]:
    """As lists: ``taps`` (class, tap, offset+1: one-hot), ``members`` (class, phase: 1 where the phase
    belongs to the class), each class's size."""
    phases, offsets = _phase_classes(factor)
    taps = [[[1.0 if o + 1 == col else 0.0 for col in range(3)] for o in offs] for offs in offsets]
    members = [[1.0 if a in group else 0.0 for a in range(factor)] for group in phases]
    return taps, members, [float(len(group)) for group in phases]


def _phase_matrices(factor: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_phase_tables` as tensors of ``like``'s dtype and device: taps (n×3×3), members (n×f), sizes."""
    return tuple(torch.tensor(t, dtype=like.dtype, device=like.device) for t in _phase_tables(factor))  # type: ignore[return-value]


def _entry_counts(sizes: Tensor, h: int, w: int) -> Tensor:
    """Full-resolution pixels behind each query entry in (i, r, j, s) order: |class r| · |class s|, for an
    h×w prior with phase-class ``sizes``."""
    n = sizes.shape[0]
    return (sizes[:, None, None] * sizes[None, None, :]).expand(n, w, n).flatten().repeat(h)


def _upsample_factor(host: tuple[int, int], prior: tuple[int, int]) -> int | None:
    """The integer ``f`` with ``host == f·prior`` on both axes (nearest upsampling by ``f``), else None.
    Always None under ONNX export, so the exported graph resizes the prior for whatever size it is run at."""
    (h, w), (hs, ws) = host, prior
    if exporting():  # the factor is a property of the traced size: resize in the graph
        return None
    if hs and ws and h % hs == 0 and w % ws == 0 and h // hs == w // ws:
        return h // hs
    return None


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _pixels(x: Tensor) -> Tensor:
    """B×C×H×W (channels-last strides) -> B×H×W×C view."""
    return x.permute(0, 2, 3, 1)


def _pointwise_then_depthwise(x: Tensor, pointwise: nn.Conv2d, depthwise: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """``depthwise(pointwise(x)).chunk(2, dim=1)``, each half computed by its own pair of convolutions.

    Same values and parameters (the halves use slices of the two bias-free weights), but each half is a
    dense tensor: on a channels-last map a channel slice of the joint output is strided, and the GELU,
    gating, norms and matmuls that read it run about 2x slower on it (and the chunk's backward concatenates
    the two gradients into one more full-size copy).
    """
    outs = []
    for w_point, w_depth in zip(pointwise.weight.chunk(2), depthwise.weight.chunk(2), strict=True):
        mid = _pointwise(x, w_point)
        outs.append(F.conv2d(mid, w_depth, padding=depthwise.padding, groups=w_depth.shape[0]))
    return outs[0], outs[1]


_FUSED_DTYPES = (torch.float32, torch.float64)
_cpu_ops: dict[str, object] = {}


def _cpu_op(name: str) -> object | None:
    """``torch.ops.skf.<name>`` with a CPU kernel, once ``components.cpu_kernels`` registered it, else None
    (the SE blocks then use the equivalent eager ops)."""
    op = _cpu_ops.get(name)
    if op is None:
        try:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"skf::{name}", "CPU"):
                return None
        except RuntimeError:  # not defined in this process
            return None
        op = _cpu_ops[name] = getattr(torch.ops.skf, name)
    return op


def _capturing() -> bool:
    """True while TorchScript traces or torch.compile / export captures the graph: the ``skf`` CPU ops and
    the autograd Functions around them are left out then, so the captured graph has standard ops only."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """``torch.bmm(a, b)``; through oneDNN (``torch.ops.skf.bmm``) for CPU fp32 when registered."""
    op = _cpu_op("bmm") if a.device.type == "cpu" and a.dtype == b.dtype == torch.float32 else None
    if op is None or _capturing():
        return torch.bmm(a, b)
    return op(a, b)  # type: ignore[operator]


def _baddbmm_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``acc += a @ b`` in place for a contiguous ``acc`` (oneDNN like :func:`_bmm`)."""
    op = _cpu_op("baddbmm_") if acc.device.type == "cpu" and acc.dtype == torch.float32 else None
    if op is None or a.dtype != acc.dtype or b.dtype != acc.dtype or not acc.is_contiguous():
        return acc.baddbmm_(a, b)
    return op(acc, a, b)  # type: ignore[operator]


class _BatchedMatmul(torch.autograd.Function):
    """``a @ b`` (B×M×K by B×K×N) with both passes through :func:`_bmm`."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, b)
        return _bmm(a, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        grad_a = _bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_b = _bmm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """Batched ``a @ b`` with autograd, on oneDNN where :func:`_bmm` is (plain ``@`` when tracing/compiling)."""
    if a.device.type != "cpu" or _capturing() or _cpu_op("bmm") is None:
        return a @ b
    return _BatchedMatmul.apply(a, b)


class _GeluGate(torch.autograd.Function):
    """``gelu(u) * gate`` through the fused CPU ops (:mod:`components.cpu_kernels`); the backward recomputes
    gelu(u) instead of keeping it, so only ``u`` and the (small or shared) gate are saved."""

    @staticmethod
    def forward(ctx, u: Tensor, gate: Tensor, tanh: bool) -> Tensor:  # type: ignore[override]
        ctx.tanh = tanh
        ctx.save_for_backward(u, gate)
        return _cpu_op("gelu_gate")(u, gate, tanh)  # type: ignore[operator]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        u, gate = ctx.saved_tensors
        grad_u, grad_gate = _cpu_op("gelu_gate_backward")(grad, u, gate, ctx.tanh)  # type: ignore[operator]
        return grad_u, grad_gate, None


def _fusable(u: Tensor, gate: Tensor) -> bool:
    return (
        u.device.type == "cpu"
        and u.dtype in _FUSED_DTYPES
        and gate.dtype == u.dtype
        and gate.device == u.device
        and not _capturing()
        and _cpu_op("gelu_gate") is not None
        and _cpu_op("gelu_gate_backward") is not None
    )


def gelu_gate(u: Tensor, gate: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu(u, approximate=approximate) * gate`` for ``u`` N×F×M and ``gate`` N×1×M (broadcast over the
    F rows of each group), fused on CPU when the ops are registered, eager ops otherwise (ONNX export,
    TorchScript tracing, torch.compile, CUDA, half precision). ``approximate``: ``"none"`` or ``"tanh"``.
    """
    if u.dim() != 3 or gate.dim() != 3 or gate.shape[1] != 1 or gate.shape[::2] != u.shape[::2]:
        raise ValueError(
            f"gelu_gate expects u N×F×M and gate N×1×M, got {tuple(u.shape)} and {tuple(gate.shape)}"
        )
    if _fusable(u, gate):
        return _GeluGate.apply(u, gate, approximate == "tanh")
    return F.gelu(u, approximate=approximate) * gate


def _rows(x: Tensor) -> Tensor | None:
    """A channels-last B×C×H×W map as B·H × 1 × W·C rows without copying (None for other layouts)."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        return None
    b, c, h, w = x.shape
    return _pixels(x).reshape(b * h, 1, w * c)


def _gelu_times(u: Tensor, gate: Tensor, approximate: str) -> Tensor:
    """``F.gelu(u) * gate`` for two B×C×H×W maps (fused where :func:`gelu_gate` is, for channels-last maps
    in the same strides: what the SE blocks make inside; eager ops otherwise)."""
    rows_u, rows_gate = _rows(u), _rows(gate)
    if rows_u is None or rows_gate is None or u.stride() != gate.stride():
        return F.gelu(u, approximate=approximate) * gate
    b, c, h, w = u.shape
    return gelu_gate(rows_u, rows_gate, approximate).view(b, h, w, c).permute(0, 3, 1, 2)


#: stride, padding, dilation, transposed, output padding, groups of a plain 1×1 conv (convolution_backward)
_CONV1X1 = ((1, 1), (0, 0), (1, 1), False, (0, 0), 1)


class _Conv1x1(torch.autograd.Function):
    """A bias-free 1×1 conv of a channels-last CPU map, with a faster weight gradient (same sums).

    oneDNN's convolution weight-gradient kernel is the slow part of these convs' backward (a reduction over
    all B·H·W pixels), slower than the same products as per-image matmuls through oneDNN's matmul
    (:func:`_bmm`) summed over the batch. Below 64 channels (DRBN's 16 and 42) the matmuls lose, so those
    keep the convolution's kernel. Without the matmul op, a narrowing conv takes the adjoint conv's weight
    gradient (the wide map on the gradient side). Measurements: ``benchmarks/RESULTS.md``.
    Forward and input gradient are the convolution's own.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, *_CONV1X1, (True, False, False)
            )[0]
        if ctx.needs_input_grad[1]:
            grad_w = _conv1x1_weight_grad(grad, x, weight)
        return grad_x, grad_w


def _conv1x1_weight_grad(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``Σ_pixels grad ⊗ x`` for channels-last ``grad`` (B×O×H×W) and ``x`` (B×I×H×W): the 1×1 weight gradient."""
    b, c_out, h, w = grad.shape
    c_in = x.shape[1]
    if _cpu_op("bmm") is not None and grad.dtype == x.dtype == torch.float32 and min(c_in, c_out) >= 64:
        per_image = _bmm(
            _pixels(grad).reshape(b, h * w, c_out).transpose(1, 2), _pixels(x).reshape(b, h * w, c_in)
        )
        return per_image.sum(dim=0).view(c_out, c_in, 1, 1)
    if c_in > c_out:  # dWᵀ = xᵀ·grad: the weight gradient of the adjoint conv (c_out -> c_in)
        adjoint = weight.new_empty(c_in, c_out, 1, 1)  # only its shape is read
        grad_wt = torch.ops.aten.convolution_backward(
            x, grad, adjoint, None, *_CONV1X1, (False, True, False)
        )[1]
        return grad_wt.view(c_in, c_out).t().reshape(c_out, c_in, 1, 1)
    return torch.ops.aten.convolution_backward(grad, x, weight, None, *_CONV1X1, (False, True, False))[1]


def _pointwise(x: Tensor, weight: Tensor) -> Tensor:
    """``F.conv2d(x, weight)`` for a bias-free 1×1 ``weight``; :class:`_Conv1x1` for channels-last CPU maps
    in training (plain conv otherwise: other devices, tracing, compiling, inference)."""
    if (
        x.device.type == "cpu"
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and x.dtype == weight.dtype
        and x.is_contiguous(memory_format=torch.channels_last)
        and not _capturing()
    ):
        return _Conv1x1.apply(x, weight)
    return F.conv2d(x, weight)


class TransposedCrossAttention(nn.Module):
    """Channel-wise (d×d) cross attention: Q from the semantics, K and V from the image.

    ``q_dwconv`` is a *full* 3×3 conv in the official code despite its name; kept for checkpoint parity.
    Logits and softmax are computed in fp32 (normalisation eps 1e-12 underflows in fp16).

    ``forward(x, sem, factor)`` takes the semantic map at 1/``factor`` of ``x``'s resolution and treats
    it as nearest-upsampled by ``factor`` (module docstring); ``factor=1`` is the plain computation.
    Normalising Q and K over the pixels is folded into the d×d logits (``QKᵀ / (‖q‖‖k‖ᵀ)``, the same
    values as ``F.normalize``) so no normalised full-resolution copy is made, and the 1×1 ``project_out``
    into the per-image C×C matrix applied to V.
    """

    def __init__(self, channels: int, heads: int = 2) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.kv = nn.Conv2d(channels, channels * 2, 1, bias=False)
        self.kv_dwconv = nn.Conv2d(channels * 2, channels * 2, 3, padding=1, groups=channels * 2, bias=False)
        self.q = nn.Conv2d(channels, channels, 1, bias=False)
        self.q_dwconv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.project_out = nn.Conv2d(channels, channels, 1, bias=False)

    def _query(self, sem: Tensor, factor: int) -> tuple[Tensor, Tensor | None]:
        """Q per (low-res row, row class, low-res column, column class): B×L×C, and each entry's pixel
        count (L); for ``factor`` 1 one entry per pixel and no counts."""
        q = self.q(sem)
        weight = self.q_dwconv.weight
        if factor == 1:
            return _pixels(self.q_dwconv(q)).flatten(1, 2), None
        taps, _, sizes = _phase_matrices(factor, weight)
        _, offsets = _phase_classes(factor)
        # collapsed kernels K[r, s] = Σ_{t,u} taps[r,t,·] taps[s,u,·] W[:, :, t, u], 3×3 over (row, col) offsets
        collapsed = torch.einsum("rto,sup,abtu->rsabop", taps, taps, weight).to(q.dtype)
        padded = F.pad(q, (1, 1, 1, 1))
        b, c, h, w = q.shape
        # Each class pair only reads the offsets its kernel touches (first: -1..0, interior: 0, last: 0..1),
        # so one small conv per pair (≤ 9, fixed by the factor) does 25 taps per low-res pixel at f ≥ 3
        # (one dense collapsed conv: 81; the full-resolution conv: 9·f²).
        outs = []
        for r, rows in enumerate(offsets):
            r0, r1 = min(rows) + 1, max(rows) + 2
            for s_, cols in enumerate(offsets):
                c0, c1 = min(cols) + 1, max(cols) + 2
                window = padded[:, :, r0 : r0 + h + r1 - r0 - 1, c0 : c0 + w + c1 - c0 - 1]
                outs.append(_pixels(F.conv2d(window, collapsed[r, s_, :, :, r0:r1, c0:c1])))
        n = len(offsets)
        # (i, r, j, s) order: the order in which _pool_phases' matmuls leave the pooled key (no transpose)
        q = torch.stack([torch.stack(outs[r * n : (r + 1) * n], dim=3) for r in range(n)], dim=2)
        return q.view(b, h * n * w * n, c), _entry_counts(sizes, h, w)

    def forward(self, x: Tensor, sem: Tensor, factor: int = 1) -> Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        k, v = _pointwise_then_depthwise(x, self.kv, self.kv_dwconv)
        q, count = self._query(sem, factor)  # convs under autocast like the key's; the products below in fp32
        dtype = _at_least_fp32(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            cosine = _channel_cosine(q.to(dtype), count, k.to(dtype), factor)  # B×C×C
            # only the per-head diagonal blocks are attention logits
            logits = cosine.view(b, self.heads, d, self.heads, d).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
            attn = (logits * self.temperature.to(dtype)).softmax(dim=-1)
        # out[p, head·d + i] = Σ_j attn[head, i, j] v[p, head·d + j] is a block-diagonal C×C matrix per image;
        # the 1×1 project_out after it folds into that matrix, so one matmul does both (no conv, no copy)
        eye = torch.eye(self.heads, dtype=attn.dtype, device=attn.device)
        mix = torch.einsum("bhij,hg->bhigj", attn, eye).reshape(b, c, c)
        mix = (self.project_out.weight.view(c, c).to(mix.dtype) @ mix).transpose(1, 2).to(v.dtype)
        out = _matmul(_pixels(v).reshape(b, h * w, c), mix)
        return out.view(b, h, w, c).permute(0, 3, 1, 2)


def _pool_phases(k: Tensor, factor: int) -> Tensor:
    """The full-resolution key (B×C×H×W, channels-last) summed over each phase class of every f×f block:
    B×L×C in the query's (i, r, j, s) order (:meth:`TransposedCrossAttention._query`).

    Both sums are small matmuls with the class-membership matrix over a phase axis (twice as fast as
    ``index_add`` here, and :func:`_unpool_phases` is the same with its transpose).
    """
    px = _pixels(k)
    if factor == 1:
        return px.flatten(1, 2)
    b, hh, ww, c = px.shape
    h, w = hh // factor, ww // factor
    members = _phase_matrices(factor, k)[1]
    n = members.shape[0]
    rows = members @ px.reshape(b * h, factor, w * factor * c)  # (b·i)×r×(j, col phase, c)
    pooled = members @ rows.view(b * h * n * w, factor, c)  # (b·i·r·j)×s×c
    return pooled.view(b, -1, c)


def _unpool_phases(grad: Tensor, factor: int, shape: torch.Size) -> Tensor:
    """Adjoint of :func:`_pool_phases`: each entry's value copied to the pixels it sums, B×H×W×C."""
    b, _, hh, ww = shape
    c = grad.shape[-1]
    if factor == 1:
        return grad.reshape(b, hh, ww, c)
    h, w = hh // factor, ww // factor
    spread = _phase_matrices(factor, grad)[1].t()
    n = spread.shape[1]
    cols = spread @ grad.reshape(b * h * n * w, n, c)  # (b·i·r·j)×(col phase)×c
    return (spread @ cols.view(b * h, n, w * factor * c)).view(b, hh, ww, c)


def _cosine_parts(
    q: Tensor, count: Tensor | None, k: Tensor, factor: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward of :class:`_ChannelCosine`: the cosine, the pooled key and both clamped norms."""
    key = _pool_phases(k, factor)
    gram = _bmm(q.transpose(1, 2), key)
    q_sq = (q * q if count is None else q * q * count[:, None]).sum(dim=1)
    k_sq = _pixels(k).square().sum(dim=(1, 2))
    q_norm, k_norm = q_sq.sqrt().clamp_min(1e-12), k_sq.sqrt().clamp_min(1e-12)
    return gram / (q_norm[:, :, None] * k_norm[:, None, :]), key, q_norm, k_norm


def _channel_cosine(q: Tensor, count: Tensor | None, k: Tensor, factor: int) -> Tensor:
    """:class:`_ChannelCosine` where a gradient is wanted; the same forward as plain ops otherwise, so
    inference, TorchScript tracing and ONNX export see only standard operators."""
    if torch.jit.is_tracing() or not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        return _cosine_parts(q, count, k, factor)[0]
    return _ChannelCosine.apply(q, count, k, factor)


class _ChannelCosine(torch.autograd.Function):
    """Cosine similarity of every query channel with every key channel over the full-resolution pixels.

    ``q`` is B×L×C: one row per pooled entry (low-res pixel and phase-class pair) standing for ``count[l]``
    identical full-resolution pixels (``count`` None: one each); ``k`` is the B×C×H×W key. Returns
    ``cos[b, i, j] = Σ_p Q[p, i] K[p, j] / (‖Q_i‖ ‖K_j‖)`` (norms clamped at 1e-12 like ``F.normalize``),
    with ``Σ_p Q K`` computed as ``qᵀ`` times the key pooled over the same entries.

    A hand-written backward because autograd's costs several full-resolution passes more: the key gets its
    gradient as one spread (unpooled) map plus one fused multiply-add (not a norm backward, a masked fill and an
    accumulation), the query as one multiply-add into a GEMM, both contiguous (autograd hands the matmul's
    gradient back transposed, and adding that strided tensor into the norm's ran ~5x slower).
    """

    @staticmethod
    def forward(ctx, q: Tensor, count: Tensor | None, k: Tensor, factor: int) -> Tensor:  # type: ignore[override]
        cosine, key, q_norm, k_norm = _cosine_parts(q, count, k, factor)
        ctx.factor = factor
        ctx.save_for_backward(q, count, k, key, cosine, q_norm, k_norm)
        return cosine

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, count, k, key, cosine, q_norm, k_norm = ctx.saved_tensors
        d_gram = grad / (q_norm[:, :, None] * k_norm[:, None, :])
        weighted = grad * cosine
        # d‖Q_i‖ = -Σ_j g_ij cos_ij / ‖Q_i‖ and ∂‖Q_i‖/∂q_li = count_l q_li / ‖Q_i‖ (zero where clamped)
        q_scale = torch.where(q_norm > 1e-12, -weighted.sum(dim=2) / q_norm.square(), 0.0)
        k_scale = torch.where(k_norm > 1e-12, -weighted.sum(dim=1) / k_norm.square(), 0.0)
        grad_q = grad_k = None
        if ctx.needs_input_grad[0]:
            scale = q_scale[:, None, :] if count is None else count[:, None] * q_scale[:, None, :]
            grad_q = _baddbmm_(q * scale, key, d_gram.transpose(1, 2))
        if ctx.needs_input_grad[2]:
            full = _unpool_phases(_bmm(q, d_gram), ctx.factor, k.shape)
            full = full.addcmul_(_pixels(k), k_scale[:, None, None, :])
            grad_k = full.permute(0, 3, 1, 2)
        return grad_q, None, grad_k, None


class GatedDConvFeedForward(nn.Module):
    """Restormer GDFN: ``project_out(GELU(U1) * U2)`` with ``[U1; U2] = dwconv(project_in(x))``."""

    def __init__(self, channels: int, factor: float = 2.66, gelu: GeluKind = "exact") -> None:
        super().__init__()
        hidden = int(channels * factor)
        self.approximate = _gelu_approximate(gelu)
        self.project_in = nn.Conv2d(channels, hidden * 2, 1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        u1, u2 = _pointwise_then_depthwise(x, self.project_in, self.dwconv)
        return _pointwise(_gelu_times(u1, u2, self.approximate), self.project_out.weight)


class DualGatedFeedForward(nn.Module):
    """SNR-SKF FFN: ``project_out(GELU(project_in_R(x)) * GELU(project_in_S(y)))``.

    The released module also owns ``project_in`` (C→Hd) and ``dwconv`` (2Hd depthwise 3×3), which its
    forward never uses. They are kept so official checkpoints load strictly, but frozen
    (``requires_grad=False``) so optimisers and DDP ignore them.
    """

    def __init__(self, channels: int, factor: float = 2.66, gelu: GeluKind = "exact") -> None:
        super().__init__()
        hidden = int(channels * factor)
        self.approximate = _gelu_approximate(gelu)
        self.project_in = nn.Conv2d(channels, hidden, 1, bias=False)
        self.project_in_R = nn.Conv2d(channels, hidden, 1, bias=False)
        self.project_in_S = nn.Conv2d(channels, hidden, 1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, channels, 1, bias=False)
        self.project_in.requires_grad_(False)
        self.dwconv.requires_grad_(False)

    def forward(self, x: Tensor, y: Tensor, factor: int = 1) -> Tensor:
        """``y`` may be at 1/``factor`` of ``x``'s resolution (nearest upsampling, applied by broadcasting)."""
        ux = _pointwise(x, self.project_in_R.weight)
        gy = F.gelu(self.project_in_S(y), approximate=self.approximate)
        if factor == 1:
            return _pointwise(_gelu_times(ux, gy, self.approximate), self.project_out.weight)
        b, c, h, w = ux.shape
        hs, ws = h // factor, w // factor
        # widen gy along columns first (a small copy), then broadcast over the factor rows of each prior
        # row: the gate's backward reduction then runs over an outer axis (several times faster than one
        # over two strided axes), and the product is gelu_gate's N×F×M form
        wide = _pixels(gy)[:, :, :, None, :].expand(b, hs, ws, factor, c).reshape(b * hs, 1, w * c)
        gated = gelu_gate(_pixels(ux).reshape(b * hs, factor, w * c), wide, self.approximate)
        return _pointwise(gated.view(b, h, w, c).permute(0, 3, 1, 2), self.project_out.weight)


class SemanticEmbedding(nn.Module):
    """SE block (official ``TransformerBlock``): embeds semantic features into image features.

    Args:
        sem_channels: channels ``Cs`` of the semantic feature (HRNet stage feature or logits).
        channels: channels ``C`` of the host image feature; the output has the same shape as ``x``.
        heads: attention heads (official: 2).
        ffn: ``"gdfn"`` (LLFlow, DRBN) or ``"dual-gated"`` (SNR).
        ffn_factor: hidden expansion, ``Hd = int(C * ffn_factor)``.
        gelu: ``"exact"`` or ``"tanh"`` (DRBN's own GELU is the tanh approximation).

    Note the residual of the attention starts from the *normalised* image feature, as released.
    """

    def __init__(
        self,
        sem_channels: int,
        channels: int,
        heads: int = 2,
        ffn: FFNKind = "gdfn",
        ffn_factor: float = 2.66,
        gelu: GeluKind = "exact",
    ) -> None:
        super().__init__()
        if ffn not in ("gdfn", "dual-gated"):
            raise ValueError(f"ffn must be 'gdfn' or 'dual-gated', got {ffn!r}")
        self.sem_channels = sem_channels
        self.channels = channels
        self.ffn_kind = ffn
        self.conv1 = nn.Conv2d(sem_channels, channels, 1)
        self.norm1 = ChannelLayerNorm(channels)
        self.attn = TransposedCrossAttention(channels, heads)
        self.norm2 = ChannelLayerNorm(channels)
        self.ffn: nn.Module
        if ffn == "gdfn":
            self.ffn = GatedDConvFeedForward(channels, ffn_factor, gelu)
        else:
            self.ffn = DualGatedFeedForward(channels, ffn_factor, gelu)

    def _check(self, x: Tensor, sem: Tensor, channels: int) -> None:
        if x.dim() != 4 or sem.dim() != 4 or x.shape[0] != sem.shape[0]:
            raise ValueError(
                f"{type(self).__name__} expects 4-D x and sem with the same batch size, got "
                f"x {tuple(x.shape)} and sem {tuple(sem.shape)}"
            )
        if x.shape[1] != channels or sem.shape[1] != self.sem_channels:
            raise ValueError(
                f"{type(self).__name__} was built for x with {channels} and sem with {self.sem_channels} "
                f"channels, got {x.shape[1]} and {sem.shape[1]}; check the SE insertion point"
            )

    def _embed(self, x: Tensor, sem: Tensor) -> Tensor:
        factor = _upsample_factor(x.shape[-2:], sem.shape[-2:])
        if factor is None:  # not an integer upsampling (or a downsampling): resize here, as released
            sem = F.interpolate(sem, size=x.shape[-2:], mode="nearest")
            factor = 1
        # The output keeps the input's layout: a channels-last host (SNR-Net) pays no layout copies in
        # either pass, an NCHW host gets NCHW back.
        keep_channels_last = x.is_contiguous(memory_format=torch.channels_last)
        sem = self.norm1(self.conv1(_channels_last(sem)))  # at the prior's resolution
        x = self.norm1(_channels_last(x))
        x = x + self.attn(x, sem, factor)
        if self.ffn_kind == "gdfn":
            x = x + self.ffn(self.norm2(x))
        else:
            x = x + self.ffn(self.norm2(x), self.norm2(sem), factor)
        return x if keep_channels_last else x.contiguous()

    def forward(self, x: Tensor, sem: Tensor) -> Tensor:
        """``x``: B×C×h×w image feature; ``sem``: B×Cs×hs×ws, nearest-resized to h×w (exactly, module doc)."""
        self._check(x, sem, self.channels)
        return self._embed(x, sem)


class SemanticEmbeddingBottleneck(SemanticEmbedding):
    """LLFlow-L SE block (official ``TransformerBlock_1``): the block runs at ``inner`` channels.

    ``conv2`` projects the image feature C→inner, ``conv1`` the semantics Cs→inner, ``conv3`` maps the
    result back inner→C. GDFN with factor 1 and no skip around the projections, as released.
    """

    def __init__(
        self,
        sem_channels: int,
        channels: int = 320,
        inner: int = 192,
        heads: int = 2,
        ffn_factor: float = 1.0,
        gelu: GeluKind = "exact",
    ) -> None:
        super().__init__(sem_channels, inner, heads=heads, ffn="gdfn", ffn_factor=ffn_factor, gelu=gelu)
        self.outer_channels = channels
        self.conv2 = nn.Conv2d(channels, inner, 1)
        self.conv3 = nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, sem: Tensor) -> Tensor:
        self._check(x, sem, self.outer_channels)
        return self.conv3(self._embed(self.conv2(x), sem))
