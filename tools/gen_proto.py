"""Compile proto/kvwire/v1/*.proto into the kvwire.v1 package (the shared contract).

The generated modules land in kvwire/v1/ (ignored by git) because protoc derives
Python import paths from the .proto path: proto/kvwire/v1/x.proto -> kvwire.v1.x_pb2.
The protobuf package (the names on the wire, /kvstore.v1.KVStore/...) stays kvwire.v1.
"""
from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def generate() -> None:
    from grpc_tools import protoc
    import grpc_tools

    proto_root = ROOT / "proto"
    out = ROOT
    files = sorted(str(p.relative_to(proto_root)) for p in (proto_root / "kvwire" / "v1").glob("*.proto"))
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *files]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out / "kvwire" / "v1" / "__init__.py").write_text('"""Generated from proto/kvwire/v1 by tools/gen_proto.py; do not edit."""\n')


if __name__ == "__main__":
    generate()
    sys.exit(0)
