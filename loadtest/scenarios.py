"""What each load-test call says and when: real speech (synthetic voices at 24 kHz, the human
asterisk prompts at 8 kHz sent as G.711 mu-law) laid out on a timeline per scenario.

- answer      HALF_DUPLEX: the user speaks, then is silent; the agent answers (response latency)
- barge_in    FULL_DUPLEX: the agent talks, the user speaks over it (barge-in stop latency)
- text_inject FULL_DUPLEX: speech as in `answer`, plus a CONTEXT document and, after an
              INTERRUPT_AGENT control, a USER text injected mid-call
- text_only   TEXT_ONLY: user texts every few seconds, the agent replies in text
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCENARIOS = ("answer", "barge_in", "text_inject", "text_only")
AUDIO_SCENARIOS = SCENARIOS[:3]
ASTERISK = Path("/usr/share/asterisk/sounds/en")
ASTERISK_PROMPTS = ("all-circuits-busy-now", "cannot-complete-as-dialed", "check-number-dial-again",
                    "call-waiting", "demo-congrats", "conf-adminmenu-18", "auth-incorrect", "call-fwd-no-ans")
VOICES = ("piper-joe", "flite-slt", "flite-awb")
SENTENCES = ("I would like to book a table.", "When does the next train leave?",  # ~3 s each
             "My internet keeps dropping.", "Please change my address.")
DOCUMENT = ("Opening hours: Monday to Friday 9 am to 6 pm, Saturday 10 am to 4 pm, closed on Sundays and "
            "public holidays. Orders placed before 2 pm ship the same day; returns are free within 30 days "
            "with the receipt. The support line is 0800 555 0199.")
USER_TEXTS = ("What are your opening hours?", "Is delivery free?", "Thanks, that is all.")


@dataclass
class Speech:
    """One utterance: mono float32 at `rate`, speech between onset_s and end_s."""
    pcm: np.ndarray
    rate: int
    source: str
    encoding: str = "LINEAR16"  # or MULAW (8 kHz telephony)
    onset_s: float = 0.0
    end_s: float = 0.0


def speech_bounds(pcm: np.ndarray, rate: int, frame_ms: int = 20, rel_db: float = -35.0) -> tuple[float, float]:
    """First and last 20 ms frame louder than `rel_db` below the loudest frame, seconds."""
    n = max(1, rate * frame_ms // 1000)
    frames = pcm[: len(pcm) // n * n].reshape(-1, n) if len(pcm) >= n else pcm.reshape(1, -1)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)) + 1e-12
    loud = np.flatnonzero(20 * np.log10(rms / rms.max()) > rel_db)
    if not loud.size:
        return 0.0, 0.0
    return loud[0] * n / rate, (loud[-1] + 1) * n / rate


def load_speech(synthetic: int = 4, human: int = 4, min_s: float = 1.2, max_s: float = 4.5,
                voices: tuple[str, ...] = VOICES) -> list[Speech]:
    """Synthetic voices (24 kHz LINEAR16) and asterisk prompts (8 kHz MULAW), alternating."""
    from michi.audio.io import read_wav
    from michi.config import SAMPLE_RATE_HZ
    from michi.data.voices import synthesize

    synth, asterisk = [], []
    for i in range(synthetic):
        voice, text = voices[i % len(voices)], SENTENCES[i % len(SENTENCES)]
        try:
            pcm = synthesize(voice, text)
        except Exception:  # noqa: BLE001 - a voice not installed: use the others
            continue
        synth.append(Speech(pcm, SAMPLE_RATE_HZ, f"{voice}: {text}"))
    for name in ASTERISK_PROMPTS:
        if len(asterisk) >= human:
            break
        path = ASTERISK / f"{name}.wav"
        if path.exists():
            pcm, rate = read_wav(path)
            if rate == 8000 and min_s <= len(pcm) / rate:
                asterisk.append(Speech(pcm[: int(max_s * rate)], rate, f"asterisk {name}", "MULAW"))
    out = []
    for i in range(max(len(synth), len(asterisk))):
        out += synth[i:i + 1] + asterisk[i:i + 1]
    for s in out:
        s.onset_s, s.end_s = speech_bounds(s.pcm, s.rate)
    if not out:
        raise RuntimeError("no speech: neither a synthetic voice nor /usr/share/asterisk/sounds/en")
    return out


@dataclass
class Plan:
    """One call: the audio to stream (None: no audio), when its speech starts and ends, and the
    text/controls to send at given times (seconds from the stream's start)."""
    scenario: str
    call_s: float
    speech: Speech | None
    pcm: np.ndarray | None = None
    segments: list[tuple[float, float]] = field(default_factory=list)  # (onset_s, end_s) on the call timeline
    actions: list[tuple[float, str, str]] = field(default_factory=list)  # (t_s, "text:ROLE"|"interrupt", text)


def plan_call(scenario: str, speech: Speech | None, call_s: float) -> Plan:
    """Lay one scenario out on a `call_s` timeline. Speech turns repeat while they fit."""
    if scenario == "text_only":
        plan = Plan(scenario, call_s, None)
        t, i = 0.2, 0
        while t < call_s - 1.0:
            plan.actions.append((t, "text:USER", USER_TEXTS[i % len(USER_TEXTS)]))
            t, i = t + 3.0, i + 1
        return plan
    assert speech is not None
    rate = speech.rate
    lead, gap = {"answer": (0.3, 3.0), "barge_in": (2.0, 3.0), "text_inject": (0.3, 3.0)}[scenario]
    length = speech.end_s - speech.onset_s
    clip = speech.pcm[int(speech.onset_s * rate):int(speech.end_s * rate)]
    pcm = np.zeros(int(call_s * rate), np.float32)
    plan = Plan(scenario, call_s, speech, pcm)
    t = lead
    while t + length + 1.0 <= call_s:  # room for the speech and an end of turn
        start = int(t * rate)
        pcm[start:start + len(clip)] = clip[: len(pcm) - start]
        plan.segments.append((t, t + length))
        t += length + gap
        if scenario == "text_inject" and not plan.actions:
            # while the agent talks again after the first turn: a document (held back by the
            # client until the gateway has ended the user's turn), then the user types (an
            # INTERRUPT_AGENT control, then the text), then more turns when they fit
            t_doc = plan.segments[0][1] + 1.5
            plan.actions += [(t_doc, "text:CONTEXT", DOCUMENT), (t_doc + 2.0, "interrupt", ""),
                             (t_doc + 2.0, "text:USER", USER_TEXTS[0])]
            t = t_doc + 3.5
    return plan


def schedule(levels: list[int], scenarios: tuple[str, ...] = SCENARIOS) -> list[list[str]]:
    """Scenario of each call, level by level: round-robin carried across levels, so even a level
    of one call adds to the mix and every scenario gets about the same number of calls."""
    out, k = [], 0
    for n in levels:
        out.append([scenarios[(k + i) % len(scenarios)] for i in range(n)])
        k += n
    return out
