"""The gateway's contract with its callers: the limits it enforces, the strict reading of a
`ConverseConfig` (every value the proto can carry either means something or is refused with
INVALID_ARGUMENT), public resume tokens that name their session, and the capability listing.
Pure: no gRPC calls, no model; tested on its own."""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from michi.audio.io import AudioError
from michi.audio.pcm import _RATES_HZ, Encoding, check_format
from michi.config import TICK_MS
from michi.proto.gateway.v1 import gateway_pb2 as pb
from michi.serving.server import MAX_MESSAGE_BYTES
from michi.text_roles import ROLES

DEFAULT_INPUT = (Encoding.LINEAR16, 16_000)
ENCODINGS = {pb.LINEAR16: Encoding.LINEAR16, pb.MULAW: Encoding.MULAW, pb.ALAW: Encoding.ALAW,
             pb.FLOAT32LE: Encoding.FLOAT32LE}
PROTO_ENCODING = {v: k for k, v in ENCODINGS.items()}
# the roles a caller's TextInput may take: the API's role table (michi.text_roles), as proto values
ROLE_NAMES = {pb.TEXT_ROLE_UNSPECIFIED: "user",
              **{pb.TextRole.Value(r.upper()): r for r in ROLES if r.upper() in pb.TextRole.keys()}}
MAX_SESSION_ID_CHARS = 128


class BadRequest(ValueError):
    """Something the caller sent that the contract refuses (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Limits:
    """Every limit the gateway enforces, each a flag of the gateway (and `michi up`)."""

    max_calls: int = 4                  # admission: measured capacity of the full mix, tiny, 2 CPU cores
    max_text_bytes: int = 16 * 1024     # one TextInput, system_text or TTS text
    max_call_text_bytes: int = 256 * 1024  # all text of one call
    context_positions: int = 0          # 0: the model's max_positions
    config_timeout_s: float = 10.0      # the config must come within this
    idle_timeout_s: float = 30.0        # no client message for this long ends the call (not TTS)
    max_audio_backlog_s: float = 5.0    # caller audio ahead of real time before the oldest is dropped
    text_tokens_per_tick: int = 64      # text prefilled between two ticks of one call


@dataclass(frozen=True)
class CallConfig:
    """A checked `ConverseConfig`, with its defaults applied."""

    config: pb.ConverseConfig
    session_id: str  # "" when the server makes one
    resume_secret: str  # the store's token ("" for a new call)
    in_encoding: Encoding
    in_rate: int
    out_encoding: Encoding
    out_rate: int
    barge_in_min_speech_ms: int
    end_of_turn_silence_ms: int

    @property
    def resuming(self) -> bool:
        return bool(self.resume_secret)


def _enum(value: int, enum, field: str) -> int:
    if value not in enum.values():
        names = ", ".join(f"{n} ({v})" for n, v in enum.items())
        raise BadRequest(f"{field} = {value} is not a known value; one of: {names}")
    return value


def audio_format(fmt: pb.AudioFormat, field: str) -> tuple[Encoding, int]:
    """A given format must name both its encoding and rate, and be one the gateway takes."""
    if fmt.encoding == pb.AUDIO_ENCODING_UNSPECIFIED or fmt.encoding not in ENCODINGS:
        raise BadRequest(f"{field}.encoding = {fmt.encoding} is not supported; {supported_formats()} "
                         f"(leave {field} unset for the default)")
    if fmt.sample_rate_hz <= 0:
        raise BadRequest(f"{field}.sample_rate_hz must be set (got {fmt.sample_rate_hz}); {supported_formats()}")
    encoding = ENCODINGS[fmt.encoding]
    try:
        check_format(encoding, fmt.sample_rate_hz)
    except AudioError as e:
        raise BadRequest(f"{field}: {e}") from e
    return encoding, fmt.sample_rate_hz


def supported_formats() -> str:
    """The formats, named as the proto names them (the errors say only what a client can ask for)."""
    return "supported: " + "; ".join(f"{pb.AudioEncoding.Name(PROTO_ENCODING[e])} at {', '.join(map(str, r))} Hz"
                                     for e, r in _RATES_HZ.items())


def check_text(text: str, field: str, limits: Limits) -> None:
    size = len(text.encode())
    if size > limits.max_text_bytes:
        raise BadRequest(f"{field} is {size} bytes; the limit is {limits.max_text_bytes} bytes a message "
                         f"(--max-text-bytes)")


def parse_config(config: pb.ConverseConfig, limits: Limits) -> CallConfig:
    """Check a config strictly; BadRequest says what is wrong and what would be right."""
    _enum(config.mode, pb.Mode, "mode")
    _enum(config.turn.policy, pb.TurnPolicy, "turn.policy")
    for field in ("barge_in_min_speech_ms", "end_of_turn_silence_ms"):
        if getattr(config.turn, field) < 0:
            raise BadRequest(f"turn.{field} must be >= 0 (0: the default), got {getattr(config.turn, field)}")
    if config.max_ticks < 0:
        raise BadRequest(f"max_ticks must be >= 0 (0: no limit), got {config.max_ticks}")
    if config.mode == pb.TTS and not config.text.strip():
        raise BadRequest("TTS mode needs config.text, the text to speak")
    check_text(config.system_text, "system_text", limits)
    check_text(config.text, "text", limits)
    if len(config.session_id) > MAX_SESSION_ID_CHARS or not config.session_id.isprintable():
        raise BadRequest(f"session_id must be printable and at most {MAX_SESSION_ID_CHARS} characters")
    in_enc, in_rate = audio_format(config.input_audio, "input_audio") if config.HasField("input_audio") \
        else DEFAULT_INPUT
    out_enc, out_rate = audio_format(config.output_audio, "output_audio") if config.HasField("output_audio") \
        else (in_enc, in_rate)
    session_id, secret = config.session_id, ""
    if config.resume_token:
        session_id, secret = parse_token(config.resume_token, config.session_id)
    return CallConfig(config, session_id, secret, in_enc, in_rate, out_enc, out_rate,
                      config.turn.barge_in_min_speech_ms or 600, config.turn.end_of_turn_silence_ms or 700)


# ---- resume tokens ---------------------------------------------------------------------------------
# The public token is "<base64url(session id)>.<the store's secret>": it names its session, so a
# client resumes with the token alone. The store keeps only a hash of the secret.

def public_token(session_id: str, secret: str) -> str:
    return base64.urlsafe_b64encode(session_id.encode()).decode().rstrip("=") + "." + secret


def parse_token(token: str, session_id: str = "") -> tuple[str, str]:
    """(session id, store secret). A token without a session part (made before tokens named their
    session) needs `session_id`; a session_id that disagrees with the token is refused."""
    named, dot, secret = token.rpartition(".")
    if not dot:
        if not session_id:
            raise BadRequest("this resume_token does not name its session: give session_id too")
        return session_id, token
    try:
        named_id = base64.b64decode(named + "=" * (-len(named) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        raise BadRequest("resume_token is malformed (not a token this gateway issued)") from e
    if session_id and session_id != named_id:
        raise BadRequest("resume_token belongs to another session than session_id")
    return named_id, secret


def capabilities(limits: Limits, context_positions: int, live_calls: int, trained: bool,
                 auth_required: bool) -> pb.Capabilities:
    return pb.Capabilities(
        api_version="michi.gateway.v1",
        encodings=[pb.EncodingSupport(encoding=PROTO_ENCODING[e], sample_rates_hz=list(r)) for e, r in _RATES_HZ.items()],
        modes=[pb.CONVERSATION, pb.TTS, pb.AUDIO_CONTINUATION, pb.TEXT_ONLY],
        turn_policies=[pb.FULL_DUPLEX, pb.HALF_DUPLEX],
        limits=pb.Limits(max_text_bytes=limits.max_text_bytes, max_call_text_bytes=limits.max_call_text_bytes,
                         context_positions=context_positions, config_timeout_s=limits.config_timeout_s,
                         idle_timeout_s=limits.idle_timeout_s, max_audio_backlog_s=limits.max_audio_backlog_s,
                         max_message_bytes=MAX_MESSAGE_BYTES, text_tokens_per_tick=limits.text_tokens_per_tick),
        max_calls=limits.max_calls, live_calls=live_calls, trained_weights=trained, tick_ms=TICK_MS,
        auth_required=auth_required)
