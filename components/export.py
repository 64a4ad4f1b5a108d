"""Export an enhancer (network + SKB) to TorchScript or ONNX for runtimes without this code base.

Both formats are traced at a fixed input size: the padding of the networks and of the SKB is computed
from the input shape in Python, so a traced graph is only valid for the (H, W) it was traced with.
Export one file per deployment resolution (``--height/--width``); the batch size is fixed as well.
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
ONNX_OPSET = 18


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
) -> Path:
    """Trace ``enhancer`` on CPU for a (batch, 3, height, width) input and write it to ``out``."""
    if fmt not in FORMATS:
        raise UserInputError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = enhancer.to("cpu").eval()
    x = example_input(height, width, batch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", torch.jit.TracerWarning
        )  # shape arithmetic becomes constants, on purpose
        if fmt == "torchscript":
            traced = torch.jit.trace(model, x, check_trace=False)
            torch.jit.save(traced, str(out))
        else:
            _export_onnx(model, x, out, enhancer.spec.baseline)
    return out


def _export_onnx(model: torch.nn.Module, x: torch.Tensor, out: Path, what: str) -> None:
    """Export through ``torch.export`` to a temp file, validate it, then move it into place."""
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
        onnx.checker.check_model(str(tmp))
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"ONNX export of {what} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
            "Export --format torchscript instead"
        ) from exc
    os.replace(tmp, out)
