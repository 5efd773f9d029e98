"""The checked-in generated code must match what protos/ generates now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path)
    fresh = sorted((tmp_path / "protocol" / "_generated").glob("murmur*"))
    assert fresh, "protoc produced nothing"
    for path in fresh:
        checked_in = ROOT / "protocol" / "_generated" / path.name
        assert checked_in.exists(), f"{checked_in} missing: run `make protos`"
        assert checked_in.read_bytes() == path.read_bytes(), f"{path.name} is stale: run `make protos`"


def test_generated_modules_import() -> None:
    from protocol._generated import murmur_pb2, murmur_pb2_grpc

    assert murmur_pb2.DESCRIPTOR.package == "murmur.v1"
    assert hasattr(murmur_pb2_grpc, "PeerServiceStub")
