from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeStart(_message.Message):
    __slots__ = ("session_id", "warmup")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    warmup: _containers.RepeatedCompositeFieldContainer[Latent]
    def __init__(self, session_id: _Optional[str] = ..., warmup: _Optional[_Iterable[_Union[Latent, _Mapping]]] = ...) -> None: ...

class Latent(_message.Message):
    __slots__ = ("tick", "values")
    TICK_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    tick: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, tick: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("start", "latent")
    START_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    start: DecodeStart
    latent: Latent
    def __init__(self, start: _Optional[_Union[DecodeStart, _Mapping]] = ..., latent: _Optional[_Union[Latent, _Mapping]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("tick", "pcm")
    TICK_FIELD_NUMBER: _ClassVar[int]
    PCM_FIELD_NUMBER: _ClassVar[int]
    tick: int
    pcm: bytes
    def __init__(self, tick: _Optional[int] = ..., pcm: _Optional[bytes] = ...) -> None: ...
