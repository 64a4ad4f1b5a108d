"""Export an enhancer (network + SKB) to TorchScript or ONNX for runtimes without this code base.

ONNX graphs take any height and width: the input ``image`` and the output ``enhanced`` have dynamic axes
``height`` and ``width`` (the batch size stays fixed). They are written by the TorchScript-based exporter
(``torch.onnx.export(dynamo=False)``, opset 18) with ``dynamic_axes``: under its trace every ``x.shape[i]``
is a graph value, so the padding the networks and the SKB compute from the input shape stays symbolic.
What made the graph size-specific before is written shape-preserving in the networks (integer ceil instead
of ``math.ceil``; under :func:`models.padding.exporting` a zero pad and a same-size resize are recorded
rather than skipped, the SE blocks resize their priors in the graph, SNR-Net's 4×4 patch fold is a
reshape), and :func:`_exact_floor_division` fixes the exporter's translation of ``//`` (it truncates,
so ``-(-h // m)`` came out wrong). The graph is traced at odd sizes (the requested ones, made odd), so
every pad-to-a-multiple is recorded; it needs H, W >= ``skf.min_side`` (the largest pad multiple: reflect
padding cannot pad more than the side). Before it is written, the graph is run with onnxruntime at the
requested size and at a second, unseen size and compared with eager PyTorch; a graph that disagrees is
replaced by one exported at the requested size only (``skf.dynamic_shape`` ``false``), never written wrong.
(``torch.export`` with ``dynamic_shapes`` was tried first: it exported for many minutes and baked shapes
into reshapes.)

TorchScript is traced at the fixed (batch, H, W) it is given (``--height/--width``): its padding is
computed from the traced shape, so export one file per deployment resolution.

``layout="nhwc"`` exports a graph that takes and returns B×H×W×3, the layout of the registered pyfunc
model's signature and of decoded images; the ONNX file's metadata (``skf.*`` properties) records the
enhancer spec, the SKB fingerprint, the input layout, shape (``1x3xHxW``: symbolic H and W), value range,
whether H and W are dynamic and the smallest side the graph takes. The exported graph is checked with
``onnx.checker`` before it is written in place.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from components.errors import SKFError, UserInputError
from components.inference import Enhancer

ExportFormat = Literal["torchscript", "onnx"]
FORMATS: tuple[str, ...] = ("torchscript", "onnx")
Layout = Literal["nchw", "nhwc"]
LAYOUTS: tuple[str, ...] = ("nchw", "nhwc")
ONNX_OPSET = 18
#: the largest export/run difference the self-check before writing a dynamic ONNX graph accepts (a baked
#: shape gives errors far larger, or the wrong output shape)
DYNAMIC_CHECK_TOLERANCE = 1e-3


class _ChannelsLastIO(torch.nn.Module):
    """B×H×W×3 in, B×H×W×3 out, around an enhancer that works in B×3×H×W."""

    def __init__(self, enhancer: torch.nn.Module) -> None:
        super().__init__()
        self.enhancer = enhancer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enhancer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()


class ExportError(SKFError, RuntimeError):
    """The enhancer could not be exported to the requested format."""


def example_input(height: int, width: int, batch: int = 1) -> torch.Tensor:
    if min(height, width, batch) < 1:
        raise UserInputError(
            f"export size must be positive, got batch {batch}, {height}x{width}; pass --batch/--height/--width >= 1"
        )
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))


def export_enhancer(
    enhancer: Enhancer,
    out: str | os.PathLike[str],
    fmt: ExportFormat,
    *,
    height: int = 400,
    width: int = 600,
    batch: int = 1,
    layout: Layout = "nchw",
) -> Path:
    """Export ``enhancer`` on CPU for a (batch, 3, height, width) input (``nhwc``: (batch, height, width,
    3)) and write it to ``out``: TorchScript for that size, ONNX for any H, W >= its ``skf.min_side``
    (module docstring)."""
    if fmt not in FORMATS:
        raise UserInputError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise UserInputError(f"unknown input layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model: torch.nn.Module = enhancer.to("cpu").eval()
    x = example_input(height, width, batch)
    if layout == "nhwc":
        model = _ChannelsLastIO(model).eval()
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes become constants, on purpose
            traced = torch.jit.trace(model, _in_layout(x, layout), check_trace=False)
        torch.jit.save(traced, str(out))
        return out
    _export_onnx_dynamic(model, enhancer, (batch, height, width), layout, out)
    return out


def _in_layout(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous() if layout == "nhwc" else x


def min_side(enhancer: Enhancer) -> int:
    """The smallest H and W a dynamic ONNX graph of ``enhancer`` takes: the largest multiple it pads to
    (the network's stride, the SKB's ``pad_multiple``), since a reflect pad cannot exceed the side."""
    # a floor of 8 under the nets' own strides (4-16)
    multiples = [int(getattr(enhancer.net, "stride", 1)), 8]
    if enhancer.skb is not None:
        multiples.append(int(enhancer.skb.pad_multiple))
    return max(multiples)


def _export_onnx_dynamic(
    model: torch.nn.Module, enhancer: Enhancer, shape: tuple[int, int, int], layout: Layout, out: Path
) -> None:
    """Export with dynamic H, W, check it at the requested and an unseen size, else export the fixed size."""
    batch, height, width = shape
    what, side = enhancer.spec.baseline, min_side(enhancer)
    # odd sides are multiples of no stride, so every pad-to-a-multiple is traced (a zero pad would be skipped)
    traced = _in_layout(example_input(max(height, side) | 1, max(width, side) | 1, batch), layout)
    checks = [(height, width), (max(height, side) + 2 * side + 3, max(width, side) + side + 5)]
    if min(height, width) >= side:
        tmp = _export_onnx(
            model, traced, out, what, onnx_metadata(enhancer, traced.shape, layout, side),
            layout=layout, dynamic=True,
        )  # fmt: skip
        error = _dynamic_error(model, tmp, [example_input(h, w, batch) for h, w in checks], layout)
        if error <= DYNAMIC_CHECK_TOLERANCE:
            os.replace(tmp, out)
            return
        tmp.unlink(missing_ok=True)
        warnings.warn(
            f"the dynamic-size ONNX graph of {what} differs from PyTorch by {error:.3g} at sizes {checks}; "
            f"exported for {height}x{width} only (skf.dynamic_shape=false)",
            RuntimeWarning,
            stacklevel=3,
        )
    x = _in_layout(example_input(height, width, batch), layout)
    tmp = _export_onnx(
        model, x, out, what, onnx_metadata(enhancer, x.shape, layout), layout=layout, dynamic=False
    )
    os.replace(tmp, out)


def _dynamic_error(model: torch.nn.Module, path: Path, inputs: list[torch.Tensor], layout: Layout) -> float:
    """Largest |onnxruntime - eager| of the graph at ``path`` over ``inputs`` (inf for a wrong shape)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in inputs:
        x = _in_layout(x, layout)
        with torch.no_grad():
            expected = model(x).numpy()
        try:
            (got,) = session.run(["enhanced"], {"image": x.numpy()})
        except Exception:  # e.g. a shape recorded as a constant that no longer fits: not a dynamic graph
            return float("inf")
        if got.shape != expected.shape:
            return float("inf")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def onnx_metadata(
    enhancer: Enhancer,
    shape: torch.Size | tuple[int, ...],
    layout: Layout,
    dynamic_min_side: int | None = None,
) -> dict[str, str]:
    """What a runtime needs to feed the graph and to know which model it is (``skf.*`` properties).

    ``dynamic_min_side``: the graph takes any H, W of at least this size (``skf.input_shape`` then reads
    ``1x3xHxW``, NHWC ``1xHxWx3``); None: exactly ``shape``."""
    dims = [str(int(d)) for d in shape]
    if dynamic_min_side is not None:
        h_axis, w_axis = (1, 2) if layout == "nhwc" else (2, 3)
        dims[h_axis], dims[w_axis] = "H", "W"
    meta = {
        "skf.spec": enhancer.spec.to_json(),
        "skf.baseline": enhancer.spec.baseline,
        "skf.skb_fingerprint": enhancer.spec.skb_fingerprint or "none",
        "skf.input_layout": layout.upper(),
        "skf.input_shape": "x".join(dims),
        "skf.dynamic_shape": "true" if dynamic_min_side is not None else "false",
        "skf.input_range": "float32 RGB in [0, 1]",
        "skf.output": f"enhanced image, same layout and shape ({layout.upper()}), float32 in [0, 1]",
    }
    if dynamic_min_side is not None:
        meta["skf.dynamic_axes"] = "height, width"
        meta["skf.min_side"] = str(dynamic_min_side)
    return meta


@contextlib.contextmanager
def _exact_floor_division() -> Iterator[None]:
    """Translate ``//`` on traced sizes as floor division while exporting.

    The TorchScript-based exporter writes ``aten::floor_divide`` as ONNX ``Div``, which truncates: the
    ceil ``-(-h // m)`` (the SKB's pad and crop sizes) then comes out one multiple short for any H that is
    not a multiple of m. The exporter's own floor division (``Div`` with a sign fix-up; ``Floor`` for
    floats) replaces it for the duration of the export.
    """
    try:
        from torch.onnx._internal.torchscript_exporter import symbolic_opset9
    except ImportError:  # older torch
        from torch.onnx import symbolic_opset9  # type: ignore[no-redef]

    floor_divide: Any = symbolic_opset9._floor_divide
    names = ("aten::floor_divide", "aten::floordiv")
    for name in names:
        torch.onnx.register_custom_op_symbolic(name, floor_divide, ONNX_OPSET)
    try:
        yield
    finally:
        for name in names:
            torch.onnx.unregister_custom_op_symbolic(name, ONNX_OPSET)


def _export_onnx(
    model: torch.nn.Module,
    x: torch.Tensor,
    out: Path,
    what: str,
    metadata: dict[str, str],
    *,
    layout: Layout,
    dynamic: bool,
) -> Path:
    """Export to a temp file beside ``out``, add ``metadata``, validate it; returns the temp file (the caller
    moves it into place)."""
    import onnx

    tmp = out.with_name(f".{out.name}.tmp")
    axes = {1: "height", 2: "width"} if layout == "nhwc" else {2: "height", 3: "width"}
    try:
        with torch.no_grad(), warnings.catch_warnings(), _exact_floor_division():
            # size checks (channel counts, even sides after padding) are recorded as traced constants
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # strided slices
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                dynamo=False,
                input_names=["image"],
                output_names=["enhanced"],
                dynamic_axes={"image": axes, "enhanced": axes} if dynamic else None,
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
            )
        graph = onnx.load(str(tmp))
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, str(tmp))
        onnx.checker.check_model(str(tmp))
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"ONNX export of {what} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
            "Export --format torchscript instead"
        ) from exc
    return tmp
