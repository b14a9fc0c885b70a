"""Which implementation runs the control path's hot loops: compiled code from csrc/, or the pure-Python
reference beside each function.

Two extensions are built by the normal install (setup.py): kvwire._native (csrc/kvnative: block keys,
the local socket's frames, the Pin call's messages, a prefix load's kernel tables; used by keys.py, local_wire.py,
pin_codec.py, engines/load_tables.py) and
kvstore._native (csrc/kvstore_native: the server's prefix Pin bookkeeping; block_table.py). Each is used
whenever it imports; a missing or stale build logs one warning and its callers run the references,
which give the same answers (tests/kvwire/test_native.py, tests/kvstore/test_pin_table.py hold the two
against each other). KVSTORE_NATIVE=0 forces the references everywhere, for tests and for ruling the
compiled code out. A native function answers NotImplemented for an input it leaves to its reference,
so callers write `result = native.f(...)`, then `if result is NotImplemented: <reference>`.
"""
from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger(__name__)

NATIVE_ENV = "KVSTORE_NATIVE"
ABI = 6  # csrc/kvnative/kvnative.h KVNATIVE_ABI: a build of other arguments and answers is not used


def disabled() -> bool:
    return os.environ.get(NATIVE_ENV, "").strip().lower() in ("0", "off", "false", "no")


def load(module: str, abi: int) -> tuple[ModuleType | None, str]:
    """The compiled module if it imports and was built from this source's ABI, else None; and why, in words."""
    if disabled():
        return None, f"off ({NATIVE_ENV}={os.environ[NATIVE_ENV]})"
    try:
        compiled = importlib.import_module(module)
    except ImportError as err:
        log.warning("%s is not built (%s): running its pure-Python reference, several times slower; "
                    "reinstall (pip install -e .) where a C compiler is found to build it", module, err)
        return None, f"not built ({err})"
    if getattr(compiled, "ABI", None) != abi:
        log.warning("%s is a stale build (ABI %s, this source expects %s): running its pure-Python reference; reinstall to rebuild it",
                    module, getattr(compiled, "ABI", None), abi)
        return None, "stale build"
    return compiled, "on"


native, status = load("kvwire._native", ABI)
