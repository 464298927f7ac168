"""`make proto`: regenerate the gRPC Python code from proto/ with grpcio-tools.

The generated modules are committed under meshnode/rpc/generated/ so that a plain
`pip install` of a fresh clone works without grpcio-tools; `make proto` rebuilds them and a test
checks that the committed copy is current. Never edit the generated files by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "meshnode" / "rpc" / "generated"


def main() -> int:
    protos = sorted(PROTO_DIR.rglob("*.proto"))
    if not protos:
        print("make proto: no .proto files under proto/, nothing to do")
        return 0
    from grpc_tools import protoc  # imported here: only `make proto` needs grpcio-tools

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={OUT_DIR}",
        f"--pyi_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        *[str(p) for p in protos],
    ]
    rc = protoc.main(args)
    if rc != 0:
        print(f"make proto: protoc failed with exit code {rc}", file=sys.stderr)
        return int(rc)
    print(f"make proto: generated {len(protos)} file(s) into {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
