"""Regenerate protocol/_generated from protos/ (run via `make protos`).

The proto path is mapped onto the package path so the generated gRPC module imports
`protocol._generated.murmur_pb2` absolutely, without sys.path tricks.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = "protocol/_generated"


def generate(out_root: Path) -> None:
    """Write murmur_pb2.py, .pyi and _pb2_grpc.py under out_root/protocol/_generated."""
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    protos = sorted((ROOT / "protos").glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_DIR}={ROOT / 'protos'}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(f"{PACKAGE_DIR}/{p.name}" for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
