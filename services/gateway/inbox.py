"""What the caller sends, read off the stream as it arrives and held for the next tick: audio
(any byte length: a partial sample waits for the rest), text (checked against the limits; a
refusal is an event, and the call goes on), controls and playback marks. A message that breaks the
contract (a second config, a corrupt message) ends the call with INVALID_ARGUMENT."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from michi.audio.pcm import Encoding, decode
from michi.proto.gateway.v1 import gateway_pb2 as pb

from .contract import ROLE_NAMES, BadRequest, Limits, check_text


@dataclass(frozen=True)
class Corrupt:
    """A request whose bytes did not parse: the servicer answers INVALID_ARGUMENT, not UNKNOWN."""

    error: str


def parse_request(raw: bytes) -> pb.ConverseRequest | Corrupt:
    try:
        return pb.ConverseRequest.FromString(raw)
    except DecodeError as e:
        return Corrupt(str(e) or "not a ConverseRequest")


def request_kind(request) -> str:
    """The request's oneof, or raise BadRequest for corrupt or empty messages."""
    if isinstance(request, Corrupt):
        raise BadRequest(f"a corrupt ConverseRequest (protobuf could not parse it: {request.error})")
    kind = request.WhichOneof("request")
    if kind is None:
        raise BadRequest("an empty ConverseRequest (none of config, audio, text, control, playback is set)")
    return kind


class CallInbox:
    """What the client sent since the last tick."""

    def __init__(self, encoding: Encoding, limits: Limits):
        self.encoding, self.limits = encoding, limits
        self.audio: list[np.ndarray] = []
        self.partial = b""  # bytes of a sample that has not fully arrived
        self.text: list[tuple[str, str]] = []
        self.errors: list[tuple[grpc.StatusCode, str]] = []  # refusals that do not end the call
        self.played: int | None = None  # the latest PlaybackMark
        self.text_bytes = 0
        self.interrupt = self.ended = self.closed = self.wants_reply = False
        self.last_input = time.monotonic()
        self._event = asyncio.Event()

    # ---- the reader -------------------------------------------------------------------------------
    async def read(self, requests) -> None:
        """Fill the inbox from the client's stream until it ends (BadRequest on a broken contract)."""
        try:
            async for request in requests:
                self.take(request)
                self._event.set()
        finally:
            self.closed = True
            self._event.set()

    def take(self, request) -> None:
        kind = request_kind(request)
        self.last_input = time.monotonic()
        if kind == "audio":
            self._audio(request.audio)
        elif kind == "text":
            self._text(request.text)
        elif kind == "control":
            action = request.control.action
            if action == pb.Control.END_CALL:
                self.ended = True
            elif action == pb.Control.INTERRUPT_AGENT:
                self.interrupt = True
            else:
                self.errors.append((grpc.StatusCode.INVALID_ARGUMENT,
                                    f"control.action = {action} is not a known action; one of END_CALL (1), "
                                    "INTERRUPT_AGENT (2)"))
        elif kind == "playback":
            if request.playback.played_samples < 0:
                self.errors.append((grpc.StatusCode.INVALID_ARGUMENT,
                                    f"playback.played_samples must be >= 0, got {request.playback.played_samples}"))
            else:
                self.played = max(self.played or 0, request.playback.played_samples)
        else:
            raise BadRequest("a second `config` in one stream; open a new stream to change it")

    def _audio(self, data: bytes) -> None:
        data = self.partial + data
        width = self.encoding.bytes_per_sample
        whole = len(data) - len(data) % width
        self.partial = data[whole:]
        if whole:
            self.audio.append(decode(data[:whole], self.encoding))

    def _text(self, message: pb.TextInput) -> None:
        if message.role not in ROLE_NAMES:
            self.errors.append((grpc.StatusCode.INVALID_ARGUMENT,
                                f"text.role = {message.role} is not a known role; the text was not used"))
            return
        try:
            check_text(message.text, "text", self.limits)
        except BadRequest as e:
            self.errors.append((grpc.StatusCode.INVALID_ARGUMENT, f"{e}; the text was not used"))
            return
        size = len(message.text.encode())
        if self.text_bytes + size > self.limits.max_call_text_bytes:
            self.errors.append((grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this call has sent {self.text_bytes} bytes of text; {size} more would pass the "
                                f"limit of {self.limits.max_call_text_bytes} bytes a call (--max-call-text-bytes); "
                                "the text was not used"))
            return
        self.text_bytes += size
        self.text.append((ROLE_NAMES[message.role], message.text))
        self.wants_reply = self.wants_reply or message.role in (pb.USER, pb.TEXT_ROLE_UNSPECIFIED)

    # ---- the call loop's side ---------------------------------------------------------------------
    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self._event.clear()

    def idle_s(self) -> float:
        return time.monotonic() - self.last_input

    def has_input(self) -> bool:
        return bool(self.audio or self.text)

    def take_audio(self) -> list[np.ndarray]:
        audio, self.audio = self.audio, []
        return audio

    def take_text(self) -> list[tuple[str, str]]:
        text, self.text = self.text, []
        return text

    def take_errors(self) -> list[tuple[grpc.StatusCode, str]]:
        errors, self.errors = self.errors, []
        return errors

    def take_interrupt(self) -> bool:
        interrupt, self.interrupt = self.interrupt, False
        return interrupt
