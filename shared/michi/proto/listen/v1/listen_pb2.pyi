from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeStart(_message.Message):
    __slots__ = ("session_id", "sample_rate_hz")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sample_rate_hz: int
    def __init__(self, session_id: _Optional[str] = ..., sample_rate_hz: _Optional[int] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("start", "pcm")
    START_FIELD_NUMBER: _ClassVar[int]
    PCM_FIELD_NUMBER: _ClassVar[int]
    start: EncodeStart
    pcm: bytes
    def __init__(self, start: _Optional[_Union[EncodeStart, _Mapping]] = ..., pcm: _Optional[bytes] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("frame", "latent", "tokens", "text", "interim")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INTERIM_FIELD_NUMBER: _ClassVar[int]
    frame: int
    latent: _containers.RepeatedScalarFieldContainer[float]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    text: str
    interim: str
    def __init__(self, frame: _Optional[int] = ..., latent: _Optional[_Iterable[float]] = ..., tokens: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., interim: _Optional[str] = ...) -> None: ...
