from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckRequest(_message.Message):
    __slots__ = ("principal", "permission", "scope", "shadow_version", "stickiness_key", "token", "at_least_revision")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    STICKINESS_KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    AT_LEAST_REVISION_FIELD_NUMBER: _ClassVar[int]
    principal: str
    permission: str
    scope: str
    shadow_version: str
    stickiness_key: str
    token: str
    at_least_revision: int
    def __init__(self, principal: _Optional[str] = ..., permission: _Optional[str] = ..., scope: _Optional[str] = ..., shadow_version: _Optional[str] = ..., stickiness_key: _Optional[str] = ..., token: _Optional[str] = ..., at_least_revision: _Optional[int] = ...) -> None: ...

class ObservedDecision(_message.Message):
    __slots__ = ("version", "allowed", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: str
    allowed: bool
    reason: str
    def __init__(self, version: _Optional[str] = ..., allowed: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("allowed", "reason", "decided_by", "enforced_version", "active_version", "selection", "mismatch", "observed", "revision")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    ENFORCED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    MISMATCH_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    reason: str
    decided_by: str
    enforced_version: str
    active_version: str
    selection: str
    mismatch: bool
    observed: _containers.RepeatedCompositeFieldContainer[ObservedDecision]
    revision: int
    def __init__(self, allowed: _Optional[bool] = ..., reason: _Optional[str] = ..., decided_by: _Optional[str] = ..., enforced_version: _Optional[str] = ..., active_version: _Optional[str] = ..., selection: _Optional[str] = ..., mismatch: _Optional[bool] = ..., observed: _Optional[_Iterable[_Union[ObservedDecision, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class Block(_message.Message):
    __slots__ = ("block_id", "origin_volume", "origin_account", "created_at", "checksum")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_VOLUME_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    origin_volume: str
    origin_account: str
    created_at: int
    checksum: str
    def __init__(self, block_id: _Optional[str] = ..., origin_volume: _Optional[str] = ..., origin_account: _Optional[str] = ..., created_at: _Optional[int] = ..., checksum: _Optional[str] = ...) -> None: ...

class ManifestHeader(_message.Message):
    __slots__ = ("principal", "token", "action", "at_least_revision")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    AT_LEAST_REVISION_FIELD_NUMBER: _ClassVar[int]
    principal: str
    token: str
    action: str
    at_least_revision: int
    def __init__(self, principal: _Optional[str] = ..., token: _Optional[str] = ..., action: _Optional[str] = ..., at_least_revision: _Optional[int] = ...) -> None: ...

class BlockBatch(_message.Message):
    __slots__ = ("blocks",)
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[Block]
    def __init__(self, blocks: _Optional[_Iterable[_Union[Block, _Mapping]]] = ...) -> None: ...

class FilterManifestRequest(_message.Message):
    __slots__ = ("header", "block", "blocks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    header: ManifestHeader
    block: Block
    blocks: BlockBatch
    def __init__(self, header: _Optional[_Union[ManifestHeader, _Mapping]] = ..., block: _Optional[_Union[Block, _Mapping]] = ..., blocks: _Optional[_Union[BlockBatch, _Mapping]] = ...) -> None: ...

class RefusedBlock(_message.Message):
    __slots__ = ("block_id", "origin_account", "reason")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    origin_account: str
    reason: str
    def __init__(self, block_id: _Optional[str] = ..., origin_account: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ManifestSummary(_message.Message):
    __slots__ = ("allowed", "refused", "version", "revision", "complete", "permission")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    allowed: int
    refused: int
    version: str
    revision: int
    complete: bool
    permission: str
    def __init__(self, allowed: _Optional[int] = ..., refused: _Optional[int] = ..., version: _Optional[str] = ..., revision: _Optional[int] = ..., complete: _Optional[bool] = ..., permission: _Optional[str] = ...) -> None: ...

class BatchAnswer(_message.Message):
    __slots__ = ("allowed", "refused")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    allowed: _containers.RepeatedCompositeFieldContainer[Block]
    refused: _containers.RepeatedCompositeFieldContainer[RefusedBlock]
    def __init__(self, allowed: _Optional[_Iterable[_Union[Block, _Mapping]]] = ..., refused: _Optional[_Iterable[_Union[RefusedBlock, _Mapping]]] = ...) -> None: ...

class FilterManifestResponse(_message.Message):
    __slots__ = ("allowed", "refused", "summary", "answers")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    allowed: Block
    refused: RefusedBlock
    summary: ManifestSummary
    answers: BatchAnswer
    def __init__(self, allowed: _Optional[_Union[Block, _Mapping]] = ..., refused: _Optional[_Union[RefusedBlock, _Mapping]] = ..., summary: _Optional[_Union[ManifestSummary, _Mapping]] = ..., answers: _Optional[_Union[BatchAnswer, _Mapping]] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("payload", "principal", "permission", "scope", "key_id", "issued_at", "expires_at", "event_id", "revision", "signature")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    principal: str
    permission: str
    scope: str
    key_id: str
    issued_at: int
    expires_at: int
    event_id: str
    revision: int
    signature: bytes
    def __init__(self, payload: _Optional[bytes] = ..., principal: _Optional[str] = ..., permission: _Optional[str] = ..., scope: _Optional[str] = ..., key_id: _Optional[str] = ..., issued_at: _Optional[int] = ..., expires_at: _Optional[int] = ..., event_id: _Optional[str] = ..., revision: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SignEventRequest(_message.Message):
    __slots__ = ("token", "principal", "permission", "scope", "payload", "ttl_seconds")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    token: str
    principal: str
    permission: str
    scope: str
    payload: bytes
    ttl_seconds: int
    def __init__(self, token: _Optional[str] = ..., principal: _Optional[str] = ..., permission: _Optional[str] = ..., scope: _Optional[str] = ..., payload: _Optional[bytes] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class SignEventResponse(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ...) -> None: ...

class VerifyEventRequest(_message.Message):
    __slots__ = ("envelope", "consume")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    CONSUME_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    consume: bool
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., consume: _Optional[bool] = ...) -> None: ...

class VerifyEventResponse(_message.Message):
    __slots__ = ("valid", "allowed", "reason", "version", "revision")
    VALID_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    allowed: bool
    reason: str
    version: str
    revision: int
    def __init__(self, valid: _Optional[bool] = ..., allowed: _Optional[bool] = ..., reason: _Optional[str] = ..., version: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...
