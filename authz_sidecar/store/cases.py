"""Policy test cases registered in etcd, one document per service (``cases/<service>``), next to
its catalog: the expectations every shadow must meet before a controller promotes it."""

from __future__ import annotations

import json

from authz_sidecar.documents.cases import cases_document, parse_cases
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.cases import Cases
from authz_sidecar.store.policy import Change, PolicyStore, StoreError

# One etcd value per service, well under etcd's request limit.
MAX_CASES_BYTES = 1024 * 1024


class CaseStore:
    def __init__(self, policy: PolicyStore) -> None:
        self.policy = policy
        self.layout = policy.layout

    async def put(self, cases: Cases, who: str, reason: str) -> dict[str, object]:
        """Register (replace) a service's cases, audited."""
        if not cases.service:
            raise StoreError("registered cases belong to a service: name it (service: in the file, or --service)")
        value = json.dumps(cases_document(cases), sort_keys=True).encode()
        if len(value) > MAX_CASES_BYTES:
            raise StoreError(f"the cases of {cases.service!r} take {len(value):,} bytes; at most {MAX_CASES_BYTES:,}")
        key = self.layout.service_cases(cases.service)
        change = Change(
            "cases_put", subject=cases.service, fields={"who": who, "reason": reason, "cases": len(cases.cases)}
        )
        entry = await self.policy.record(change, [self.policy.etcd.kv.txn_op_put(key, value)])
        return {"service": cases.service, "cases": len(cases.cases), "audit_seq": entry["seq"]}

    async def all(self) -> tuple[list[Cases], dict[str, str]]:
        """Every service's cases, and the keys that do not parse (with why): reported, never run."""
        _revision, kvs = await self.policy.etcd.list_prefix(self.layout.cases)
        found: list[Cases] = []
        broken: dict[str, str] = {}
        for kv in kvs:
            try:
                found.append(parse_cases(json.loads(kv.value), kv.key))
            except (ValueError, DocumentError) as exc:
                broken[kv.key] = str(exc)
        return found, broken
