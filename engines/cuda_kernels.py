"""The engines' own CUDA kernels (csrc/*.cu), compiled at first use by cupy's NVRTC.

Compiling at run time keeps the wheel pure Python and the CPU install free of a
CUDA toolchain; what needs a kernel asks `kernels(source, names)` and falls
back to its torch or host path on None. A failed build is remembered and
logged once per source: retrying cost every caller a compile attempt.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# A wheel carries csrc/ inside this package (setup.py); a source checkout has it at the top.
CSRC_DIRS = (Path(__file__).resolve().parent / "csrc", Path(__file__).resolve().parent.parent / "csrc")

_lock = threading.Lock()
_built: dict[str, dict[str, Any]] = {}
_errors: dict[str, str] = {}


def kernels(source: str, names: tuple[str, ...], options: tuple[str, ...] = ("-std=c++14",)) -> dict[str, Any] | None:
    """The named extern "C" functions of csrc/<source>, or None where cupy, NVRTC or a GPU is missing."""
    with _lock:
        if source not in _built and source not in _errors:
            try:
                import cupy

                module = cupy.RawModule(code=source_path(source).read_text(), options=options)
                _built[source] = {name: module.get_function(name) for name in names}
            except Exception as err:  # no cupy, no NVRTC, no GPU, no csrc in this install
                _errors[source] = f"{type(err).__name__}: {err}"
                log.warning("CUDA kernels of %s unavailable, using the fallback path: %s", source, _errors[source])
        return _built.get(source)


def source_path(source: str) -> Path:
    for directory in CSRC_DIRS:
        if (directory / source).is_file():
            return directory / source
    raise FileNotFoundError(f"{source} is in none of {', '.join(map(str, CSRC_DIRS))}")


def build_error(source: str) -> str | None:
    """Why kernels(source, ...) returned None, if it did."""
    return _errors.get(source)


def on_stream(stream: torch.cuda.Stream):
    """cupy's view of a torch stream, to launch on: Stream.from_external where cupy has it
    (ExternalStream is deprecated there)."""
    import cupy

    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None and hasattr(stream, "__cuda_stream__"):
        return from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream)
