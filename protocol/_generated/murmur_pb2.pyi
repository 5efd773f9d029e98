from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ("protocol_major",)
    PROTOCOL_MAJOR_FIELD_NUMBER: _ClassVar[int]
    protocol_major: int
    def __init__(self, protocol_major: _Optional[int] = ...) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("protocol_version", "software_version", "run_id", "round", "slice")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: str
    software_version: str
    run_id: str
    round: int
    slice: int
    def __init__(self, protocol_version: _Optional[str] = ..., software_version: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., slice: _Optional[int] = ...) -> None: ...
