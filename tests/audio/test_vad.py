import builtins
from pathlib import Path

import numpy as np
import pytest

from michi.audio.io import AudioError, read_wav
from michi.audio.resample import resample_stream
from michi.audio.vad import (
    SileroModel,
    SileroVAD,
    SpeechEnd,
    SpeechSegmenter,
    SpeechStart,
    StreamingVAD,
    push_batch,
)

SOUNDS = Path("/usr/share/asterisk/sounds/en")  # Debian asterisk-core-sounds-en-wav: one human speaker, 8 kHz
needs_speech = pytest.mark.skipif(
    not (SOUNDS / "hello-world.wav").is_file(),
    reason="real speech prompts missing: apt-get install -y asterisk-core-sounds-en-wav",
)
PROMPTS = ["hello-world.wav", "auth-thankyou.wav", "conf-onlyperson.wav", "digits/2.wav"]


@pytest.fixture(scope="module")
def model():
    return SileroModel()


def _speech(name):
    pcm, rate = read_wav(SOUNDS / name)
    assert rate == 8000
    return pcm


def _energy_bounds(pcm, rate, frame_s=0.01, floor_db=35):
    """First and last sample of 10 ms frames within `floor_db` of the loudest one."""
    n = int(frame_s * rate)
    frames = pcm[:len(pcm) // n * n].reshape(-1, n)
    db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    active = np.flatnonzero(db > db.max() - floor_db)
    return active[0] * n, (active[-1] + 1) * n


def _run(vad, pcm, chunk=None):
    if chunk is None:
        return vad.push(pcm) + vad.flush()
    events = []
    for i in range(0, len(pcm), chunk):
        events += vad.push(pcm[i:i + chunk])
    return events + vad.flush()


def _segments(events):
    assert all(isinstance(e, SpeechStart if i % 2 == 0 else SpeechEnd) for i, e in enumerate(events))
    return [(s.sample_index, e.sample_index) for s, e in zip(events[::2], events[1::2])]


def test_model_from_package_onnx_without_torch_code(monkeypatch):
    real_import = builtins.__import__

    def guarded(name, *args, **kwargs):
        assert not name.startswith("silero_vad"), "the silero_vad package (torch code) was imported"
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)
    model = SileroModel()
    assert model.path.name == "silero_vad.onnx" and model.path.is_file()
    assert model.session.get_session_options().intra_op_num_threads == 1
    assert len(SileroVAD(16000, model).push(np.zeros(5120, np.float32))) == 10


@needs_speech
def test_matches_the_silero_package_reference_wrapper(model):
    """Same probabilities as silero-vad's own OnnxWrapper (context, state, sr fed the same way)."""
    torch = pytest.importorskip("torch")
    from silero_vad.utils_vad import OnnxWrapper

    pcm = resample_stream(_speech("conf-onlyperson.wav"), 8000, 16000)
    reference = OnnxWrapper(str(model.path), force_onnx_cpu=True)
    n = len(pcm) // 512
    want = [float(reference(torch.from_numpy(pcm[k * 512:(k + 1) * 512].copy()), 16000)[0, 0]) for k in range(n)]
    got = SileroVAD(16000, model).push(pcm)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert max(want) > 0.9


@needs_speech
@pytest.mark.parametrize("name", PROMPTS)
def test_speech_segments_cover_the_speech(model, name):
    pcm = _speech(name)
    segments = _segments(_run(StreamingVAD(8000, model), pcm))
    covered = np.zeros(len(pcm), bool)
    for start, end in segments:
        covered[start:end] = True
    frames = pcm[:len(pcm) // 80 * 80].reshape(-1, 80)  # 10 ms
    db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    loud = db > db.max() - 30
    assert covered[:len(frames) * 80].reshape(-1, 80)[loud].all(axis=1).mean() > 0.85


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_silence_and_low_noise_are_not_speech(model, rate):
    rng = np.random.default_rng(rate)
    for level_db in (None, -50, -30):
        pcm = np.zeros(3 * rate, np.float32) if level_db is None else \
            (10 ** (level_db / 20) * rng.standard_normal(3 * rate)).astype(np.float32)
        vad = SileroVAD(rate, model)
        probs = np.concatenate([vad.push(pcm), vad.flush()])
        assert len(probs) == 94 and probs.max() < 0.3  # 3 s = 93.75 windows of 32 ms
        assert _run(StreamingVAD(rate, model), pcm) == []


@needs_speech
@pytest.mark.parametrize("name", PROMPTS)
@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_padded_speech_onset_and_end_on_the_input_clock(model, name, rate):
    pcm8 = _speech(name)
    onset, offset = (b * rate // 8000 + rate for b in _energy_bounds(pcm8, 8000))
    pcm = resample_stream(pcm8, 8000, rate) if rate != 8000 else pcm8
    silence = np.zeros(rate, np.float32)
    events = _run(StreamingVAD(rate, model, min_silence_ms=300), np.concatenate([silence, pcm, silence]))
    ((start, end),) = _segments(events)
    assert abs(start - onset) <= 0.2 * rate
    assert offset - 0.05 * rate <= end <= offset + 0.3 * rate
    assert events[1].speech_ms == pytest.approx(1000 * (end - start) / rate, abs=1)


@needs_speech
def test_chunked_feeding_gives_the_same_events(model):
    pcm = np.concatenate([_speech("conf-onlyperson.wav"), np.zeros(4000, np.float32), _speech("hello-world.wav")])
    whole_probs = SileroVAD(8000, model).push(pcm)
    whole = _run(StreamingVAD(8000, model, min_silence_ms=200), pcm)
    assert len(whole) == 4  # two utterances
    for chunk in (13, 160, 777):
        assert _run(StreamingVAD(8000, model, min_silence_ms=200), pcm, chunk) == whole
    vad = SileroVAD(8000, model)
    sizes = np.random.default_rng(0).integers(0, 700, 200)
    edges = np.minimum(np.cumsum(np.concatenate([[0], sizes])), len(pcm))
    chunked = np.concatenate([vad.push(pcm[a:b]) for a, b in zip(edges[:-1], edges[1:])] + [vad.push(pcm[edges[-1]:])])
    np.testing.assert_allclose(chunked, whole_probs, atol=1e-4)


@needs_speech
def test_streams_share_one_model_with_their_own_state(model):
    a, b = _speech("conf-onlyperson.wav"), _speech("hello-world.wav")
    ref_a, ref_b = SileroVAD(8000, model).push(a), SileroVAD(8000, model).push(b)
    va, vb = SileroVAD(8000, model), SileroVAD(8000, model)
    got_a, got_b, got_a2, got_b2 = [], [], [], []
    for i in range(0, len(a), 400):  # interleaved on one session
        got_a.append(va.push(a[i:i + 400]))
        got_b.append(vb.push(b[i:i + 400]))
    va.reset()
    vb.reset()
    for i in range(0, len(a), 400):  # batched: windows of both streams in one model call
        pa, pb = push_batch([va, vb], [a[i:i + 400], b[i:i + 400]])
        got_a2.append(pa)
        got_b2.append(pb)
    for got, ref in ((got_a, ref_a), (got_b, ref_b), (got_a2, ref_a), (got_b2, ref_b)):
        np.testing.assert_allclose(np.concatenate(got), ref, atol=1e-4)
    assert ref_a.max() > 0.9 and ref_b.max() > 0.9


@needs_speech
def test_speech_ms_tells_a_backchannel_from_a_barge_in(model):
    silence = np.zeros(8000, np.float32)
    short = _run(StreamingVAD(8000, model), np.concatenate([silence, _speech("digits/2.wav"), silence]))
    assert [type(e) for e in short] == [SpeechStart, SpeechEnd] and short[1].speech_ms < 600  # "two"
    vad = StreamingVAD(8000, model)
    long = np.concatenate([silence, _speech("conf-onlyperson.wav"), silence])
    crossed_at = None
    for i in range(0, len(long), 160):  # 20 ms chunks, as a gateway would
        vad.push(long[i:i + 160])
        if crossed_at is None and vad.speech_ms > 600:
            crossed_at = i
    assert crossed_at is not None and crossed_at < 8000 + 0.9 * 8000  # decided while the user still talks
    assert vad.in_speech or vad.speech_ms == 0


def test_segmenter_hysteresis_and_input_clock():
    seg = SpeechSegmenter(8000, min_speech_ms=96, min_silence_ms=128)
    # A 2-window blip is shorter than min_speech: nothing. Then speech whose probabilities sag
    # between offset and onset (kept), a 3-window dip below offset (shorter than min_silence: kept),
    # then real silence.
    probs = [0.1, 0.9, 0.8, 0.1, 0.6, 0.4, 0.4, 0.2, 0.2, 0.2, 0.7, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1]
    assert seg.push(np.array(probs[:6])) == [] and seg.speech_ms == 0  # not confirmed yet
    events = seg.push(np.array(probs[6:7]))
    assert events == [SpeechStart(4 * 256)] and seg.in_speech and seg.speech_ms == 96
    events = seg.push(np.array(probs[7:]))
    assert events == [SpeechEnd(12 * 256, speech_ms=(12 - 4) * 32)] and seg.speech_ms == 0
    seg44 = SpeechSegmenter(44100, min_speech_ms=32)
    assert seg44.push(np.array([0.1, 0.1, 0.9])) == [SpeechStart(round(2 * 0.032 * 44100))]
    assert seg44.flush() == [SpeechEnd(round(3 * 0.032 * 44100), 32.0)]
    with pytest.raises(ValueError):
        SpeechSegmenter(onset=0.3, offset=0.5)


def test_unsupported_rate(model):
    with pytest.raises(AudioError, match="11025"):
        SileroVAD(11025, model)
