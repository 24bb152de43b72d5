"""Check called directly in this process: what one decision costs without gRPC or Envoy."""

from __future__ import annotations

import time
from pathlib import Path

from google.protobuf.struct_pb2 import Struct

from authz_sidecar._proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from authz_sidecar.decision.answering import Answering
from authz_sidecar.decision.decider import Decider
from authz_sidecar.decision.identity import JWT_AUTHN_NAMESPACE, build_identifier
from authz_sidecar.decision.state import SnapshotStore
from authz_sidecar.fronts.extauthz import CheckHandler
from authz_sidecar.store.sources.files import FilePolicySource
from authz_sidecar.telemetry.metrics import Metrics


def sample_request(principal: str) -> pb.CheckRequest:
    """A CheckRequest shaped like Envoy's: headers, jwt_authn payload, a route-table path."""
    req = pb.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.id, http.host, http.protocol = "GET", "/things/1", "r-1", "bench", "HTTP/2"
    http.headers.update(
        {
            ":authority": "bench",
            ":method": "GET",
            ":path": "/things/1",
            "user-agent": "h2load",
            "authorization": "Bearer x" * 20,
            "x-request-id": "7c1f",
        }
    )
    payload = Struct()
    payload.update({"jwt_payload": {"sub": principal, "iss": "demo", "aud": "things", "exp": 2_000_000_000}})
    req.attributes.metadata_context.filter_metadata[JWT_AUTHN_NAMESPACE].CopyFrom(payload)
    return req


def direct_check_rate(policy: Path, seconds: float, principal: str) -> tuple[float, float, float, int]:
    store = SnapshotStore()
    store.install(FilePolicySource(policy, service="things", region="bench").load())
    metrics = Metrics(store)
    identifier = build_identifier(["jwt_authn"], jwt_authn_payload_key="jwt_payload")
    handler = CheckHandler(Answering(Decider(store, identifier, metrics), metrics))
    raw = sample_request(principal).SerializeToString()
    parse = pb.CheckRequest.FromString
    check = handler.check
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    clock = time.perf_counter
    while clock() < deadline:
        started = clock()
        response = check(parse(raw))
        response.SerializeToString()
        samples.append(clock() - started)
    if response.status.code != 0:
        raise RuntimeError("direct Check did not allow the allowed principal")
    total = sum(samples)
    samples.sort()
    return len(samples) / total, samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6, len(samples)
