from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    LINEAR16: _ClassVar[AudioEncoding]
    MULAW: _ClassVar[AudioEncoding]
    ALAW: _ClassVar[AudioEncoding]
    FLOAT32LE: _ClassVar[AudioEncoding]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    CONVERSATION: _ClassVar[Mode]
    TTS: _ClassVar[Mode]
    AUDIO_CONTINUATION: _ClassVar[Mode]
    TEXT_ONLY: _ClassVar[Mode]

class TurnPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TURN_POLICY_UNSPECIFIED: _ClassVar[TurnPolicy]
    FULL_DUPLEX: _ClassVar[TurnPolicy]
    HALF_DUPLEX: _ClassVar[TurnPolicy]

class TextRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TEXT_ROLE_UNSPECIFIED: _ClassVar[TextRole]
    USER: _ClassVar[TextRole]
    SYSTEM: _ClassVar[TextRole]
    CONTEXT: _ClassVar[TextRole]
    TOOL: _ClassVar[TextRole]

class EndReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    END_REASON_UNSPECIFIED: _ClassVar[EndReason]
    CLIENT_END_CALL: _ClassVar[EndReason]
    CLIENT_CLOSED: _ClassVar[EndReason]
    MAX_TICKS: _ClassVar[EndReason]
    IDLE_TIMEOUT: _ClassVar[EndReason]
    CONTEXT_FULL: _ClassVar[EndReason]
    TTS_DONE: _ClassVar[EndReason]
    STAGE_FAILED: _ClassVar[EndReason]
    BAD_INPUT: _ClassVar[EndReason]
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
LINEAR16: AudioEncoding
MULAW: AudioEncoding
ALAW: AudioEncoding
FLOAT32LE: AudioEncoding
MODE_UNSPECIFIED: Mode
CONVERSATION: Mode
TTS: Mode
AUDIO_CONTINUATION: Mode
TEXT_ONLY: Mode
TURN_POLICY_UNSPECIFIED: TurnPolicy
FULL_DUPLEX: TurnPolicy
HALF_DUPLEX: TurnPolicy
TEXT_ROLE_UNSPECIFIED: TextRole
USER: TextRole
SYSTEM: TextRole
CONTEXT: TextRole
TOOL: TextRole
END_REASON_UNSPECIFIED: EndReason
CLIENT_END_CALL: EndReason
CLIENT_CLOSED: EndReason
MAX_TICKS: EndReason
IDLE_TIMEOUT: EndReason
CONTEXT_FULL: EndReason
TTS_DONE: EndReason
STAGE_FAILED: EndReason
BAD_INPUT: EndReason

class AudioFormat(_message.Message):
    __slots__ = ("encoding", "sample_rate_hz")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioEncoding
    sample_rate_hz: int
    def __init__(self, encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate_hz: _Optional[int] = ...) -> None: ...

class TurnConfig(_message.Message):
    __slots__ = ("policy", "barge_in_min_speech_ms", "end_of_turn_silence_ms")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BARGE_IN_MIN_SPEECH_MS_FIELD_NUMBER: _ClassVar[int]
    END_OF_TURN_SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    policy: TurnPolicy
    barge_in_min_speech_ms: int
    end_of_turn_silence_ms: int
    def __init__(self, policy: _Optional[_Union[TurnPolicy, str]] = ..., barge_in_min_speech_ms: _Optional[int] = ..., end_of_turn_silence_ms: _Optional[int] = ...) -> None: ...

class ConverseConfig(_message.Message):
    __slots__ = ("session_id", "resume_token", "mode", "input_audio", "output_audio", "turn", "system_text", "text", "max_ticks", "seed")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    INPUT_AUDIO_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_AUDIO_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_TEXT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_TICKS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    resume_token: str
    mode: Mode
    input_audio: AudioFormat
    output_audio: AudioFormat
    turn: TurnConfig
    system_text: str
    text: str
    max_ticks: int
    seed: int
    def __init__(self, session_id: _Optional[str] = ..., resume_token: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., input_audio: _Optional[_Union[AudioFormat, _Mapping]] = ..., output_audio: _Optional[_Union[AudioFormat, _Mapping]] = ..., turn: _Optional[_Union[TurnConfig, _Mapping]] = ..., system_text: _Optional[str] = ..., text: _Optional[str] = ..., max_ticks: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class TextInput(_message.Message):
    __slots__ = ("role", "text")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    role: TextRole
    text: str
    def __init__(self, role: _Optional[_Union[TextRole, str]] = ..., text: _Optional[str] = ...) -> None: ...

class PlaybackMark(_message.Message):
    __slots__ = ("played_samples",)
    PLAYED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    played_samples: int
    def __init__(self, played_samples: _Optional[int] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("action",)
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[Control.Action]
        END_CALL: _ClassVar[Control.Action]
        INTERRUPT_AGENT: _ClassVar[Control.Action]
    ACTION_UNSPECIFIED: Control.Action
    END_CALL: Control.Action
    INTERRUPT_AGENT: Control.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    action: Control.Action
    def __init__(self, action: _Optional[_Union[Control.Action, str]] = ...) -> None: ...

class ConverseRequest(_message.Message):
    __slots__ = ("config", "audio", "text", "control", "playback")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    PLAYBACK_FIELD_NUMBER: _ClassVar[int]
    config: ConverseConfig
    audio: bytes
    text: TextInput
    control: Control
    playback: PlaybackMark
    def __init__(self, config: _Optional[_Union[ConverseConfig, _Mapping]] = ..., audio: _Optional[bytes] = ..., text: _Optional[_Union[TextInput, _Mapping]] = ..., control: _Optional[_Union[Control, _Mapping]] = ..., playback: _Optional[_Union[PlaybackMark, _Mapping]] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("session_id", "resume_token", "resumed", "tick", "trained_weights", "start_sample")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    TRAINED_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    START_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    resume_token: str
    resumed: bool
    tick: int
    trained_weights: bool
    start_sample: int
    def __init__(self, session_id: _Optional[str] = ..., resume_token: _Optional[str] = ..., resumed: _Optional[bool] = ..., tick: _Optional[int] = ..., trained_weights: _Optional[bool] = ..., start_sample: _Optional[int] = ...) -> None: ...

class AgentAudio(_message.Message):
    __slots__ = ("audio", "tick", "start_sample")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    START_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    audio: bytes
    tick: int
    start_sample: int
    def __init__(self, audio: _Optional[bytes] = ..., tick: _Optional[int] = ..., start_sample: _Optional[int] = ...) -> None: ...

class AgentText(_message.Message):
    __slots__ = ("text", "tick")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    text: str
    tick: int
    def __init__(self, text: _Optional[str] = ..., tick: _Optional[int] = ...) -> None: ...

class UserTranscript(_message.Message):
    __slots__ = ("text", "tick", "is_final", "interim")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    INTERIM_FIELD_NUMBER: _ClassVar[int]
    text: str
    tick: int
    is_final: bool
    interim: str
    def __init__(self, text: _Optional[str] = ..., tick: _Optional[int] = ..., is_final: _Optional[bool] = ..., interim: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("tick", "turn_start", "turn_end", "barge_in", "error", "reply_done")
    class TurnStart(_message.Message):
        __slots__ = ("speaker",)
        SPEAKER_FIELD_NUMBER: _ClassVar[int]
        speaker: str
        def __init__(self, speaker: _Optional[str] = ...) -> None: ...
    class TurnEnd(_message.Message):
        __slots__ = ("speaker",)
        SPEAKER_FIELD_NUMBER: _ClassVar[int]
        speaker: str
        def __init__(self, speaker: _Optional[str] = ...) -> None: ...
    class BargeIn(_message.Message):
        __slots__ = ("agent_samples_played", "agent_samples_cut", "heard_text", "playback_confirmed", "cut_sample")
        AGENT_SAMPLES_PLAYED_FIELD_NUMBER: _ClassVar[int]
        AGENT_SAMPLES_CUT_FIELD_NUMBER: _ClassVar[int]
        HEARD_TEXT_FIELD_NUMBER: _ClassVar[int]
        PLAYBACK_CONFIRMED_FIELD_NUMBER: _ClassVar[int]
        CUT_SAMPLE_FIELD_NUMBER: _ClassVar[int]
        agent_samples_played: int
        agent_samples_cut: int
        heard_text: str
        playback_confirmed: bool
        cut_sample: int
        def __init__(self, agent_samples_played: _Optional[int] = ..., agent_samples_cut: _Optional[int] = ..., heard_text: _Optional[str] = ..., playback_confirmed: _Optional[bool] = ..., cut_sample: _Optional[int] = ...) -> None: ...
    class Error(_message.Message):
        __slots__ = ("code", "message")
        CODE_FIELD_NUMBER: _ClassVar[int]
        MESSAGE_FIELD_NUMBER: _ClassVar[int]
        code: int
        message: str
        def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
    class ReplyDone(_message.Message):
        __slots__ = ("text",)
        TEXT_FIELD_NUMBER: _ClassVar[int]
        text: str
        def __init__(self, text: _Optional[str] = ...) -> None: ...
    TICK_FIELD_NUMBER: _ClassVar[int]
    TURN_START_FIELD_NUMBER: _ClassVar[int]
    TURN_END_FIELD_NUMBER: _ClassVar[int]
    BARGE_IN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REPLY_DONE_FIELD_NUMBER: _ClassVar[int]
    tick: int
    turn_start: Event.TurnStart
    turn_end: Event.TurnEnd
    barge_in: Event.BargeIn
    error: Event.Error
    reply_done: Event.ReplyDone
    def __init__(self, tick: _Optional[int] = ..., turn_start: _Optional[_Union[Event.TurnStart, _Mapping]] = ..., turn_end: _Optional[_Union[Event.TurnEnd, _Mapping]] = ..., barge_in: _Optional[_Union[Event.BargeIn, _Mapping]] = ..., error: _Optional[_Union[Event.Error, _Mapping]] = ..., reply_done: _Optional[_Union[Event.ReplyDone, _Mapping]] = ...) -> None: ...

class CallEnded(_message.Message):
    __slots__ = ("reason", "detail", "ticks", "agent_samples")
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    TICKS_FIELD_NUMBER: _ClassVar[int]
    AGENT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    reason: EndReason
    detail: str
    ticks: int
    agent_samples: int
    def __init__(self, reason: _Optional[_Union[EndReason, str]] = ..., detail: _Optional[str] = ..., ticks: _Optional[int] = ..., agent_samples: _Optional[int] = ...) -> None: ...

class ConverseResponse(_message.Message):
    __slots__ = ("started", "audio", "agent_text", "transcript", "event", "ended")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    AGENT_TEXT_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    started: SessionStarted
    audio: AgentAudio
    agent_text: AgentText
    transcript: UserTranscript
    event: Event
    ended: CallEnded
    def __init__(self, started: _Optional[_Union[SessionStarted, _Mapping]] = ..., audio: _Optional[_Union[AgentAudio, _Mapping]] = ..., agent_text: _Optional[_Union[AgentText, _Mapping]] = ..., transcript: _Optional[_Union[UserTranscript, _Mapping]] = ..., event: _Optional[_Union[Event, _Mapping]] = ..., ended: _Optional[_Union[CallEnded, _Mapping]] = ...) -> None: ...

class GetCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EncodingSupport(_message.Message):
    __slots__ = ("encoding", "sample_rates_hz")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATES_HZ_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioEncoding
    sample_rates_hz: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rates_hz: _Optional[_Iterable[int]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_text_bytes", "max_call_text_bytes", "context_positions", "config_timeout_s", "idle_timeout_s", "max_audio_backlog_s", "max_message_bytes", "text_tokens_per_tick")
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CALL_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_AUDIO_BACKLOG_S_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TEXT_TOKENS_PER_TICK_FIELD_NUMBER: _ClassVar[int]
    max_text_bytes: int
    max_call_text_bytes: int
    context_positions: int
    config_timeout_s: float
    idle_timeout_s: float
    max_audio_backlog_s: float
    max_message_bytes: int
    text_tokens_per_tick: int
    def __init__(self, max_text_bytes: _Optional[int] = ..., max_call_text_bytes: _Optional[int] = ..., context_positions: _Optional[int] = ..., config_timeout_s: _Optional[float] = ..., idle_timeout_s: _Optional[float] = ..., max_audio_backlog_s: _Optional[float] = ..., max_message_bytes: _Optional[int] = ..., text_tokens_per_tick: _Optional[int] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("api_version", "encodings", "modes", "turn_policies", "limits", "max_calls", "live_calls", "trained_weights", "tick_ms", "auth_required")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    TURN_POLICIES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MAX_CALLS_FIELD_NUMBER: _ClassVar[int]
    LIVE_CALLS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TICK_MS_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    api_version: str
    encodings: _containers.RepeatedCompositeFieldContainer[EncodingSupport]
    modes: _containers.RepeatedScalarFieldContainer[Mode]
    turn_policies: _containers.RepeatedScalarFieldContainer[TurnPolicy]
    limits: Limits
    max_calls: int
    live_calls: int
    trained_weights: bool
    tick_ms: int
    auth_required: bool
    def __init__(self, api_version: _Optional[str] = ..., encodings: _Optional[_Iterable[_Union[EncodingSupport, _Mapping]]] = ..., modes: _Optional[_Iterable[_Union[Mode, str]]] = ..., turn_policies: _Optional[_Iterable[_Union[TurnPolicy, str]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., max_calls: _Optional[int] = ..., live_calls: _Optional[int] = ..., trained_weights: _Optional[bool] = ..., tick_ms: _Optional[int] = ..., auth_required: _Optional[bool] = ...) -> None: ...
