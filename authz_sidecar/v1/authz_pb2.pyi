from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckRequest(_message.Message):
    __slots__ = ("principal", "permission", "scope", "shadow_version", "stickiness_key")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    STICKINESS_KEY_FIELD_NUMBER: _ClassVar[int]
    principal: str
    permission: str
    scope: str
    shadow_version: str
    stickiness_key: str
    def __init__(self, principal: _Optional[str] = ..., permission: _Optional[str] = ..., scope: _Optional[str] = ..., shadow_version: _Optional[str] = ..., stickiness_key: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("allowed", "reason", "decided_by", "enforced_version", "active_version", "selection", "mismatch", "observed")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    ENFORCED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    MISMATCH_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    reason: str
    decided_by: str
    enforced_version: str
    active_version: str
    selection: str
    mismatch: bool
    observed: _containers.RepeatedCompositeFieldContainer[ObservedDecision]
    def __init__(self, allowed: _Optional[bool] = ..., reason: _Optional[str] = ..., decided_by: _Optional[str] = ..., enforced_version: _Optional[str] = ..., active_version: _Optional[str] = ..., selection: _Optional[str] = ..., mismatch: _Optional[bool] = ..., observed: _Optional[_Iterable[_Union[ObservedDecision, _Mapping]]] = ...) -> None: ...
