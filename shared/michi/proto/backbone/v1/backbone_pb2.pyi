from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Open(_message.Message):
    __slots__ = ("session_id", "seed", "text_temperature", "history")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEXT_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seed: int
    text_temperature: float
    history: _containers.RepeatedCompositeFieldContainer[HistoryRecord]
    def __init__(self, session_id: _Optional[str] = ..., seed: _Optional[int] = ..., text_temperature: _Optional[float] = ..., history: _Optional[_Iterable[_Union[HistoryRecord, _Mapping]]] = ...) -> None: ...

class Tick(_message.Message):
    __slots__ = ("tick", "user_latent", "user_tokens", "forced_text", "forced_latent")
    TICK_FIELD_NUMBER: _ClassVar[int]
    USER_LATENT_FIELD_NUMBER: _ClassVar[int]
    USER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORCED_TEXT_FIELD_NUMBER: _ClassVar[int]
    FORCED_LATENT_FIELD_NUMBER: _ClassVar[int]
    tick: int
    user_latent: _containers.RepeatedScalarFieldContainer[float]
    user_tokens: _containers.RepeatedScalarFieldContainer[int]
    forced_text: _containers.RepeatedScalarFieldContainer[int]
    forced_latent: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, tick: _Optional[int] = ..., user_latent: _Optional[_Iterable[float]] = ..., user_tokens: _Optional[_Iterable[int]] = ..., forced_text: _Optional[_Iterable[int]] = ..., forced_latent: _Optional[_Iterable[float]] = ...) -> None: ...

class TextInsert(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class HistoryRecord(_message.Message):
    __slots__ = ("tick", "text")
    TICK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    tick: TickRecord
    text: TextInsert
    def __init__(self, tick: _Optional[_Union[TickRecord, _Mapping]] = ..., text: _Optional[_Union[TextInsert, _Mapping]] = ...) -> None: ...

class TickRecord(_message.Message):
    __slots__ = ("tick", "user_latent", "user_tokens", "agent_token", "agent_latent", "agent_phones", "next_phone")
    TICK_FIELD_NUMBER: _ClassVar[int]
    USER_LATENT_FIELD_NUMBER: _ClassVar[int]
    USER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AGENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    AGENT_LATENT_FIELD_NUMBER: _ClassVar[int]
    AGENT_PHONES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PHONE_FIELD_NUMBER: _ClassVar[int]
    tick: int
    user_latent: _containers.RepeatedScalarFieldContainer[float]
    user_tokens: _containers.RepeatedScalarFieldContainer[int]
    agent_token: int
    agent_latent: _containers.RepeatedScalarFieldContainer[float]
    agent_phones: _containers.RepeatedScalarFieldContainer[int]
    next_phone: int
    def __init__(self, tick: _Optional[int] = ..., user_latent: _Optional[_Iterable[float]] = ..., user_tokens: _Optional[_Iterable[int]] = ..., agent_token: _Optional[int] = ..., agent_latent: _Optional[_Iterable[float]] = ..., agent_phones: _Optional[_Iterable[int]] = ..., next_phone: _Optional[int] = ...) -> None: ...

class GenerateText(_message.Message):
    __slots__ = ("max_tokens",)
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    def __init__(self, max_tokens: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("open", "tick", "text", "generate")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    open: Open
    tick: Tick
    text: TextInsert
    generate: GenerateText
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., tick: _Optional[_Union[Tick, _Mapping]] = ..., text: _Optional[_Union[TextInsert, _Mapping]] = ..., generate: _Optional[_Union[GenerateText, _Mapping]] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("position", "replayed_ticks", "trained_weights")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_TICKS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    position: int
    replayed_ticks: int
    trained_weights: bool
    def __init__(self, position: _Optional[int] = ..., replayed_ticks: _Optional[int] = ..., trained_weights: _Optional[bool] = ...) -> None: ...

class GeneratedText(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("opened", "tick", "generated", "agent_text")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    GENERATED_FIELD_NUMBER: _ClassVar[int]
    AGENT_TEXT_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    tick: TickRecord
    generated: GeneratedText
    agent_text: str
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., tick: _Optional[_Union[TickRecord, _Mapping]] = ..., generated: _Optional[_Union[GeneratedText, _Mapping]] = ..., agent_text: _Optional[str] = ...) -> None: ...
