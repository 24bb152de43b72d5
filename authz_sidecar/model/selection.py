"""Which set decides a request (DESIGN section 5).

Rule, in order (header, then cohort, then weight, then default); exactly one set is enforced, and
selection never fails the call:

1. The x-authz-shadow-version header names a live shadow whose ``testers`` list the principal:
   that shadow decides (``header``). A shadow without testers cannot be picked by header at all.
2. The header is present otherwise (unknown, malformed, not a tester): active decides
   (``header_ignored``); a tester's typo is never an error.
3. The principal is in the cohort a live (not stale) shadow has in this region: walking those
   shadows in version order, the first whose cohort holds the principal decides (``cohort``). A
   cohort is people named (by name, or by the role combination they hold in the active set), not a
   share: it does not count towards the weights, whatever the stickiness key, and one principal may
   be in the cohorts of two shadows (the first in version order decides).
4. Shadows have a canary weight in this region: walking them in version order, the first whose
   sticky bucket falls under its weight decides (``canary``).
5. Otherwise the active set decides (``default``).

Who is in a cohort is resolved when the snapshot is built (:mod:`authz_sidecar.model.cohorts`), so
step 3 is one set membership per shadow with a cohort here: no role lookup on the request path.

The bucket is a keyed BLAKE2b of (stickiness key, shadow version), so it is the same in every
process and run (Python's hash() is salted per process) and each shadow draws its own cohort:
raising a shadow's weight only adds principals to it, and a promotion does not reshuffle the
cohorts of the shadows behind it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from hashlib import blake2b

from authz_sidecar.model.engine import CompiledSet
from authz_sidecar.model.snapshot import Snapshot

BUCKETS = 10_000
_PERSON = b"authz-canary"


class Selection(StrEnum):
    DEFAULT = "default"
    HEADER = "header"
    HEADER_IGNORED = "header_ignored"
    COHORT = "cohort"
    CANARY = "canary"


def stable_bucket(key: str, version: str) -> int:
    """A bucket in [0, 10000) that depends only on the two strings."""
    digest = blake2b(
        key.encode("utf-8", "surrogatepass") + b"\x00" + version.encode("utf-8", "surrogatepass"),
        digest_size=8,
        person=_PERSON,
    ).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def select(
    snapshot: Snapshot, principal: str, header: str | None, stickiness_key: str
) -> tuple[CompiledSet, Selection]:
    """Return the enforced set and how it was chosen."""
    if header is not None:
        shadow = snapshot.by_version.get(header.strip())
        if shadow is not None and shadow.is_tester(principal):
            return shadow.compiled, Selection.HEADER
        return snapshot.active, Selection.HEADER_IGNORED
    for shadow in snapshot.cohorts:
        if principal in shadow.cohort:
            return shadow.compiled, Selection.COHORT
    for shadow in snapshot.canaries:
        if stable_bucket(stickiness_key, shadow.version) < shadow.weight_bp:
            return shadow.compiled, Selection.CANARY
    return snapshot.active, Selection.DEFAULT


def regions_over_100(*weights: Mapping[str, int]) -> list[tuple[str, int]]:
    """The regions where these canary weights (percent per region) sum past 100, with their sums,
    sorted. The one weight rule: ctl checks it before a write, a sidecar when it assembles a
    snapshot (where a shadow that pushes a region over is left out)."""
    totals: dict[str, int] = {}
    for per_region in weights:
        for region, weight in per_region.items():
            totals[region] = totals.get(region, 0) + weight
    return sorted((region, total) for region, total in totals.items() if total > 100)
