"""CPU kernels for the SE blocks (``torch.ops.skf.*``), compiled on first use on this machine.

Two small libraries, each built and loaded on its own so that one failing leaves the other in use:

* ``gelu_gate.cpp``: the feed-forward's GELU gate in one pass each way (eager PyTorch makes five passes over
  64-170-channel full-resolution maps: gelu, mul; and backward mul, mul + sum, gelu_backward);
* ``onednn_bmm.cpp``: the attention's batched fp32 matmuls through oneDNN instead of MKL (faster on AMD CPUs,
  where MKL takes its AVX2 path; measured in ``benchmarks/RESULTS.md``).

:mod:`models.se` uses an op when it is registered and the eager one otherwise, so ``models/`` stays
importable (and correct) on a bare torch install; this module does the I/O. It builds with
:func:`torch.utils.cpp_extension.load` (ninja and the machine's C++ compiler; cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, rebuilt only when the source or flags
change), for the CPU's vector ISA as ATen reports it. Set ``SKF_CPU_KERNELS=off`` to keep the eager ops.
"""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
import threading
from pathlib import Path

import torch

__all__ = ["LIBRARIES", "available", "isa_flags", "load"]

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
#: library -> (source, the ops it registers as ``torch.ops.skf.<name>``)
LIBRARIES: dict[str, tuple[Path, tuple[str, ...]]] = {
    "gelu_gate": (_HERE / "gelu_gate.cpp", ("gelu_gate", "gelu_gate_backward")),
    "onednn_bmm": (_HERE / "onednn_bmm.cpp", ("bmm", "baddbmm_")),
}
_DISABLED = {"0", "off", "false", "no"}
#: ``at::parallel_for`` is inline OpenMP (``ATen/ParallelOpenMP.h``): without ``-fopenmp`` its pragma is
#: dropped and every kernel runs on one thread. The library then links ``libgomp.so.1``, which resolves to
#: the copy torch has already loaded (same soname), so there is one OpenMP thread pool.
_BASE_FLAGS = ("-O3", "-fopenmp")
_lock = threading.Lock()
_state: dict[str, bool] = {}


def isa_flags(capability: str | None = None) -> list[str]:
    """Compiler flags selecting ATen's vector implementation for ``capability`` (default: this CPU's, as
    ``torch.backends.cpu.get_cpu_capability()`` reports it; unknown ones get the portable scalar code)."""
    cap = capability or torch.backends.cpu.get_cpu_capability()
    if cap == "AVX512":
        isa = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
    elif cap == "AVX2":
        isa = ["-mavx2", "-mfma"]
    else:
        return [*_BASE_FLAGS]
    return [*_BASE_FLAGS, f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}", *isa]


def _has_cpu_kernel(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"skf::{op}", "CPU")
    except RuntimeError:  # the operator is not defined at all
        return False


def available(*ops: str) -> bool:
    """Whether ``ops`` (default: every op of every library) have CPU kernels registered in this process."""
    wanted = ops or tuple(op for _, lib_ops in LIBRARIES.values() for op in lib_ops)
    return all(_has_cpu_kernel(op) for op in wanted)


def _ninja_on_path() -> None:
    """``cpp_extension`` runs ``ninja`` from PATH; a venv's own ninja (``pip install ninja``) is not on it
    unless the venv is activated, so add the interpreter's scripts folder when ninja is missing."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and scripts and Path(scripts, "ninja").exists():
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])


def _build(library: str, verbose: bool) -> bool:
    source, ops = LIBRARIES[library]
    if available(*ops):  # registered earlier in this process
        return True
    cap = torch.backends.cpu.get_cpu_capability()
    try:
        _ninja_on_path()
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=f"skf_{library}_{cap.lower()}",  # one cached build per vector ISA
            sources=[str(source)],
            extra_cflags=isa_flags(cap),
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # noqa: BLE001 - any build or load failure means: fall back, say why once
        message = str(exc).strip().splitlines()
        log.warning(
            "CPU kernels %s unavailable (%s: %s); the SE blocks use the eager PyTorch ops instead (same "
            "results, slower). A C++ compiler and ninja (requirements.lock) build them.",
            library,
            type(exc).__name__,
            message[0] if message else "",
        )
        return False
    if not available(*ops):
        log.warning("CPU kernels %s loaded but registered no ops; using eager ops", library)
        return False
    log.info("CPU kernels %s ready (%s, %s)", library, ", ".join(f"skf::{op}" for op in ops), cap)
    return True


def load(*, verbose: bool = False) -> bool:
    """Build (the first time on this machine) and register every library; ``True`` when all are usable.

    Never raises: a missing compiler or ninja, or a failed build, logs one warning per library and leaves
    its ops unregistered, so the SE blocks keep their eager ops. ``SKF_CPU_KERNELS=off`` builds nothing.
    """
    with _lock:
        if "ok" not in _state:
            if os.environ.get("SKF_CPU_KERNELS", "").strip().lower() in _DISABLED:
                log.info("CPU kernels disabled by SKF_CPU_KERNELS; the SE blocks use eager ops")
                _state["ok"] = False
            else:
                _state["ok"] = all([_build(library, verbose) for library in LIBRARIES])
        return _state["ok"]
