"""The generated modules match protos/ and talk the wire format Envoy uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_generated_modules_are_current() -> None:
    """A .proto edited without `make protos` fails here instead of shipping a stale module."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_method_path_and_package_are_envoys() -> None:
    service = pb.DESCRIPTOR.services_by_name["Authorization"]
    assert service.full_name == "envoy.service.auth.v3.Authorization"
    assert service.methods_by_name["Check"].input_type.full_name == "envoy.service.auth.v3.CheckRequest"


def test_unknown_fields_survive_a_round_trip() -> None:
    """Fields Envoy sends that the trimmed protos do not declare are kept, not dropped."""
    req = pb.CheckRequest()
    req.attributes.request.http.path = "/x"
    raw = req.SerializeToString() + b"\x92\x01\x03abc"  # field 18, length-delimited: unknown here
    parsed = pb.CheckRequest.FromString(raw)
    assert parsed.attributes.request.http.path == "/x"
    assert parsed.SerializeToString() == raw


def test_upb_backend_is_in_use() -> None:
    """The pure-Python protobuf backend would slow every Check several times over."""
    from google.protobuf.internal import api_implementation

    assert api_implementation.Type() == "upb"
