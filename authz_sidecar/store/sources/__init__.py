"""Where permission sets come from. Each source builds snapshots and hands them to a SnapshotStore."""

from authz_sidecar.store.sources.base import PolicySource
from authz_sidecar.store.sources.files import FilePolicySource

__all__ = ["FilePolicySource", "PolicySource"]
