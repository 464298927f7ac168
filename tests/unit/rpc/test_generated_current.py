"""The committed generated code is what `make proto` produces from proto/ today.

The descriptor (the compiled .proto) must always match. The whole text must match too when the
installed grpcio-tools is the version that generated the committed copy; a newer grpcio-tools
only changes version stamps, which `make proto` then refreshes.
"""

from __future__ import annotations

import ast
import re

import pytest

from meshnode.rpc import build_proto

_DESCRIPTOR = re.compile(r"AddSerializedFile\((b'.*?')\)", re.DOTALL)
_GRPC_VERSION = re.compile(r"GRPC_GENERATED_VERSION = '([^']+)'")


def _descriptor(text: str) -> bytes:
    match = _DESCRIPTOR.search(text)
    assert match is not None
    value = ast.literal_eval(match.group(1))
    assert isinstance(value, bytes)
    return value


def test_committed_generated_code_is_current() -> None:
    pytest.importorskip("grpc_tools")
    fresh = build_proto.generate()
    assert fresh, "no .proto files found"
    committed = {n: (build_proto.OUT_DIR / n).read_text(encoding="utf-8") for n in fresh}
    assert _descriptor(committed["mesh_pb2.py"]) == _descriptor(fresh["mesh_pb2.py"]), (
        "meshnode/rpc/generated is stale: run `make proto` and commit the result"
    )
    same_tools = _GRPC_VERSION.findall(committed["mesh_pb2_grpc.py"]) == _GRPC_VERSION.findall(
        fresh["mesh_pb2_grpc.py"]
    )
    if same_tools:
        for name, text in fresh.items():
            assert committed[name] == text, f"{name} is stale: run `make proto`"


def test_generated_modules_import_from_our_package() -> None:
    from meshnode.rpc.generated import mesh_pb2, mesh_pb2_grpc

    assert mesh_pb2.DESCRIPTOR.name == "meshnode/v1/mesh.proto"
    assert mesh_pb2.DESCRIPTOR.package == "meshnode.v1"
    assert hasattr(mesh_pb2_grpc, "MeshStub")
