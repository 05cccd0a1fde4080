"""Generation modes, all on the same weights and the same `Session`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Union

import numpy as np

from .api import Michi, Tick
from .model.phonemes import MAX_HOLD_TICKS

# The TTS stop rule, one for every caller (`tts` below, the gateway's TTS mode): forcing a text
# ends within `tts_forcing_limit` ticks, then the model goes on by itself for a tail of free ticks.
# After the text (and its phonemes) is spoken, for a caller that sees the forcing queues empty (a
# Session): room for the last sound to leave the audio delay and the decoder, without the model
# going on to words of its own.
TTS_TAIL_TICKS = 4
# After the bound, for a caller that cannot see the queues (the gateway: the backbone is another
# process; `tts_max_ticks`): also room for the phonemes still queued. 3 n + 12 ticks for n tokens
# at the default pace.
TTS_BLIND_TAIL_TICKS = 11

# A mixed prompt: ("text", "retrieved document...") or ("audio", pcm, sample_rate_hz).
Segment = Union[tuple[str, str], tuple[str, np.ndarray, int]]


@dataclass
class Generation:
    audio: np.ndarray  # float32 at 24 kHz
    text: str  # the agent's text stream
    ticks: list[Tick] = field(default_factory=list)
    user_text: str = ""
    trained: bool = False


def _collect(michi: Michi, ticks: list[Tick], skip_audio_ticks: int = 0) -> Generation:
    kept = ticks[skip_audio_ticks:]
    audio = np.concatenate([t.agent_audio for t in kept]) if kept else np.zeros(0, np.float32)
    return Generation(audio=audio, text="".join(t.agent_text for t in ticks), ticks=ticks,
                      user_text="".join(t.user_text for t in ticks), trained=michi.trained)


def tts_forcing_limit(text_tokens: int, phones: int = 0, max_pad_ticks: int = 2) -> int:
    """The most ticks forcing a TTS text can take, one tick of margin included: each forced token
    waits at most `max_pad_ticks` pads (the Session's and the backbone engine's default: 2), each
    queued phoneme is held at most `MAX_HOLD_TICKS` (model.phonemes.PhonemeQueue)."""
    return text_tokens * (max_pad_ticks + 1) + phones * (MAX_HOLD_TICKS + 1) + 1


def tts_max_ticks(text_tokens: int, max_pad_ticks: int = 2) -> int:
    """A TTS call's length for a caller that knows only how many text tokens it forces (the gateway
    with no `max_ticks`): the forcing bound, then `TTS_BLIND_TAIL_TICKS` free ticks."""
    return tts_forcing_limit(text_tokens, 0, max_pad_ticks) + TTS_BLIND_TAIL_TICKS


def tts(michi: Michi, text: str, continue_ticks: int = TTS_TAIL_TICKS, seed: int = 0, **options) -> Generation:
    """Causal TTS: the text is forced into the agent text stream at the pace the model asks for
    it (and its phonemes into the phoneme stream, where the model has one), then the model goes
    on by itself for `continue_ticks`."""
    session = michi.session(seed=seed, **options)
    session.force_agent_text(text)
    ticks: list[Tick] = []
    # Forcing always progresses, and so does the phoneme queue (model.phonemes.PhonemeQueue).
    limit = tts_forcing_limit(session.forced_pending, session.phones_pending, session.max_pad_ticks)
    while (session.forced_pending or session.phones_pending) and len(ticks) < limit:
        ticks.append(session.step())
    ticks += [session.step() for _ in range(continue_ticks)]
    return _collect(michi, ticks)


def continue_audio(michi: Michi, pcm: np.ndarray, sample_rate_hz: int, ticks: int = 25, seed: int = 0,
                   **options) -> Generation:
    """Audio continuation: the prompt is the agent's own voice (teacher forced); returns only what
    comes after it."""
    session = michi.session(seed=seed, **options)
    prompt_ticks = session.prompt_agent_audio(pcm, sample_rate_hz)
    return _collect(michi, [session.step() for _ in range(prompt_ticks + ticks)], skip_audio_ticks=prompt_ticks)


def text_to_text(michi: Michi, prompt: str, max_tokens: int = 64, seed: int = 0, **options) -> str:
    """Text in, text out: the backbone as a plain LM."""
    session = michi.session(seed=seed, **options)
    session.push_text(prompt, role="user")
    return session.generate_text(max_tokens)


def mixed(michi: Michi, segments: Iterable[Segment], ticks: int = 25, seed: int = 0, **options) -> Generation:
    """A prompt of text and audio parts, in order (e.g. a retrieved document, then a spoken
    question): text goes in as text-only positions, audio is heard as the user's speech tick by
    tick; then the agent goes on for `ticks` more."""
    session = michi.session(seed=seed, **options)
    heard: list[Tick] = []
    for segment in segments:
        if segment[0] == "text":
            session.push_text(segment[1], role="context")
        elif segment[0] == "audio":
            session.push_audio(segment[1], segment[2])
            heard += [session.step() for _ in range(math.ceil(len(session.user_audio) / session.frame))]
        else:
            raise ValueError(f"segment kind must be 'text' or 'audio', got {segment[0]!r}")
    return _collect(michi, heard + [session.step() for _ in range(ticks)])
