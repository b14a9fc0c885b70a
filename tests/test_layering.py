"""The dependency rules, checked on every build: the contract imports neither side, the client and the
server never import each other, and only the wire adapters touch generated protobuf code.

A static walk over import statements (lazy and TYPE_CHECKING imports included): a rule broken here
is broken in some code path, whether or not a test happens to run it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kvwire", "kvclient", "kvstore", "engines", "connectors")

# package -> top-level packages it must never import
FORBIDDEN = {
    "kvwire": {"kvclient", "kvstore", "engines", "connectors"},
    "kvclient": {"kvstore", "engines", "connectors"},
    "kvstore": {"kvclient", "engines", "connectors"},
    "engines": {"kvstore", "connectors"},
    "connectors": {"kvstore"},  # other engines' adapters (vLLM, LMCache): clients of the store like engines
}
# What engines and connectors may use of the client: its public API, never a transport's internals.
ENGINES_MAY_IMPORT = {"kvclient", "kvclient.client", "kvclient.errors"}
# The store core: policy and mechanism, no transport types at all.
CORE = ("kvstore/store.py", "kvstore/index.py", "kvstore/leases.py", "kvstore/block_table.py", "kvstore/placement.py",
        "kvstore/eviction.py", "kvstore/operations.py", "kvstore/api.py", "kvstore/tiers")
GENERATED = "kvwire.v1"


def sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if GENERATED.replace(".", "/") not in p.as_posix())


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_downwards(package: str) -> None:
    broken = [
        f"{rel(path)} imports {name}"
        for path in sources(package)
        for name in sorted(imported_modules(path))
        if name.split(".")[0] in FORBIDDEN[package]
    ]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("package", ("engines", "connectors"))
def test_engines_use_only_the_public_client_api(package: str) -> None:
    broken = [
        f"{rel(path)} imports {name}"
        for path in sources(package)
        for name in sorted(imported_modules(path))
        if name.startswith("kvclient") and name not in ENGINES_MAY_IMPORT and not any(name.startswith(m + ".") and m != "kvclient" for m in ENGINES_MAY_IMPORT)
    ]
    assert not broken, "\n".join(broken)


def test_the_store_core_knows_no_transport() -> None:
    core = [p for c in CORE for p in ([ROOT / c] if c.endswith(".py") else sorted((ROOT / c).rglob("*.py"))) if p.exists()]
    assert any(p.name == "store.py" for p in core)
    broken = [
        f"{rel(path)} imports {name}"
        for path in core
        for name in sorted(imported_modules(path))
        if name.split(".")[0] in ("grpc", "grpc_health", "grpc_reflection", "google") or name.startswith(GENERATED)
    ]
    assert not broken, "\n".join(broken)


# The wire adapters: the only modules outside the contract that speak generated protobuf.
WIRE_ADAPTERS = {
    "kvstore/service.py", "kvstore/admin_service.py", "kvstore/local_control.py", "kvstore/server.py", "kvstore/admin.py", "kvstore/rpc_codec.py",
    "kvstore/cluster/peers.py", "kvstore/cluster/peer_service.py",  # PeerService's two halves: client and server
    "kvclient/control.py", "kvclient/local_control.py", "kvclient/transports/grpc_inline.py",
}


def test_only_wire_adapters_import_generated_code() -> None:
    broken = [
        f"{rel(path)} imports {name}"
        for package in ("kvclient", "kvstore", "engines", "connectors")
        for path in sources(package)
        if rel(path) not in WIRE_ADAPTERS
        for name in sorted(imported_modules(path))
        if name.startswith(GENERATED)
    ]
    assert not broken, "\n".join(broken)
