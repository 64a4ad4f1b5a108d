"""Export an enhancer (network + SKB) to TorchScript or ONNX for runtimes without this code base.

Both formats are traced at a fixed input size: the padding of the networks and of the SKB is computed
from the input shape in Python, so a traced graph is only valid for the (H, W) it was traced with.
Export one file per deployment resolution (``--height/--width``); the batch size is fixed as well.
(``torch.export`` with dynamic height and width was tried: it exports for many minutes and bakes shapes
into reshapes, so the graph fails at any other size; a fixed size is the honest contract.)

``layout="nhwc"`` exports a graph that takes and returns B×H×W×3, the layout of the registered pyfunc
model's signature and of decoded images; the ONNX file's metadata (``skf.*`` properties) records the
enhancer spec, the SKB fingerprint, the input layout, size and value range.
ONNX uses the ``torch.export``-based exporter (``dynamo=True``, through ``onnxscript``): the older
TorchScript-based exporter cannot translate SNR-Net's patch fold (``col2im``). The exported graph is
checked with ``onnx.checker`` before it is written in place.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import torch

from components.errors import SKFError, UserInputError
from components.inference import Enhancer

ExportFormat = Literal["torchscript", "onnx"]
FORMATS: tuple[str, ...] = ("torchscript", "onnx")
Layout = Literal["nchw", "nhwc"]
LAYOUTS: tuple[str, ...] = ("nchw", "nhwc")
ONNX_OPSET = 18


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
    """Trace ``enhancer`` on CPU for a (batch, 3, height, width) input (``nhwc``: (batch, height, width,
    3)) and write it to ``out``."""
    if fmt not in FORMATS:
        raise UserInputError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise UserInputError(f"unknown input layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model: torch.nn.Module = enhancer.to("cpu").eval()
    x = example_input(height, width, batch)
    if layout == "nhwc":
        model, x = _ChannelsLastIO(model).eval(), x.permute(0, 2, 3, 1).contiguous()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", torch.jit.TracerWarning
        )  # shape arithmetic becomes constants, on purpose
        if fmt == "torchscript":
            traced = torch.jit.trace(model, x, check_trace=False)
            torch.jit.save(traced, str(out))
        else:
            _export_onnx(model, x, out, enhancer.spec.baseline, onnx_metadata(enhancer, x.shape, layout))
    return out


def onnx_metadata(enhancer: Enhancer, shape: torch.Size | tuple[int, ...], layout: Layout) -> dict[str, str]:
    """What a runtime needs to feed the graph and to know which model it is (``skf.*`` properties)."""
    return {
        "skf.spec": enhancer.spec.to_json(),
        "skf.baseline": enhancer.spec.baseline,
        "skf.skb_fingerprint": enhancer.spec.skb_fingerprint or "none",
        "skf.input_layout": layout.upper(),
        "skf.input_shape": "x".join(str(int(d)) for d in shape),
        "skf.input_range": "float32 RGB in [0, 1]",
        "skf.output": f"enhanced image, same layout and shape ({layout.upper()}), float32 in [0, 1]",
    }


def _export_onnx(
    model: torch.nn.Module, x: torch.Tensor, out: Path, what: str, metadata: dict[str, str]
) -> None:
    """Export through ``torch.export`` to a temp file, add ``metadata``, validate it, move it into place."""
    import onnx

    tmp = out.with_name(f".{out.name}.tmp")
    try:
        torch.onnx.export(
            model,
            (x,),
            str(tmp),
            dynamo=True,
            input_names=["image"],
            output_names=["enhanced"],
            opset_version=ONNX_OPSET,
            external_data=False,
            verbose=False,
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
    os.replace(tmp, out)
