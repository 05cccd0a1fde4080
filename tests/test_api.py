"""The Python API and the generation modes, on the tiny preset (random weights: plumbing only)."""
import numpy as np
import pytest
import torch

import michi
from michi.audio.io import AudioError
from michi.generate import continue_audio, mixed, text_to_text, tts

FRAME = 1920


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return michi.load("tiny")


def _speechlike(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def test_session_ticks(model):
    assert not model.trained
    session = model.session(seed=1)
    session.push_text("Be brief.", role="system")
    session.push_audio(_speechlike(0.5, 16_000), sample_rate_hz=16_000)
    assert len(session.user_audio) == 12_000  # resampled to 24 kHz
    ticks = [session.step() for _ in range(8)]
    assert [t.index for t in ticks] == list(range(8))
    for t in ticks:
        assert t.agent_audio.shape == (FRAME,) and t.agent_audio.dtype == np.float32
        assert np.isfinite(t.agent_audio).all() and np.abs(t.agent_audio).max() <= 1.0
        assert 0 <= t.agent_token < model.vocab.size
    # the system prompt (role prefix, BOS, EOS) and 8 ticks are all in the KV cache
    assert session.position == len("system: Be brief.") + 2 + 8
    assert len(session.user_audio) == 0  # 12000 samples = 6.25 ticks, all consumed


def test_sessions_are_deterministic_and_independent(model):
    a, b = model.session(seed=3), model.session(seed=3)
    other = model.session(seed=4)
    out_a = np.concatenate([a.step().agent_audio for _ in range(3)])
    out_other = np.concatenate([other.step().agent_audio for _ in range(3)])
    out_b = np.concatenate([b.step().agent_audio for _ in range(3)])
    assert np.array_equal(out_a, out_b)
    assert not np.array_equal(out_a, out_other)


def test_bad_input_is_refused_with_a_clear_error(model):
    session = model.session()
    with pytest.raises(AudioError, match="unsupported sample rate 12345"):
        session.push_audio(np.zeros(100, np.float32), sample_rate_hz=12_345)
    with pytest.raises(AudioError, match="NaN"):
        session.push_audio(np.array([0.0, np.nan], np.float32))
    with pytest.raises(AudioError, match="float or int16"):
        session.push_audio(np.array(["garbage"]))
    with pytest.raises(AudioError, match="1-D"):
        session.push_audio(np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="role must be one of"):
        session.push_text("hi", role="narrator")
    assert len(session.user_audio) == 0 and not session.pending_text  # nothing half-taken
    int16 = (np.ones(FRAME) * 16384).astype(np.int16)
    session.push_audio(int16)
    assert np.allclose(session.user_audio, 0.5)


def test_tts_forces_the_text_then_continues(model):
    gen = tts(model, "hello there", continue_ticks=4, seed=0)
    forced = [t.agent_text for t in gen.ticks if t.agent_text]
    assert "".join(forced).startswith("hello there")
    assert len(gen.audio) == len(gen.ticks) * FRAME
    assert len(gen.ticks) >= len("hello there") + 4


def test_audio_continuation_returns_only_the_continuation(model):
    prompt = _speechlike(0.4, 48_000)  # 0.4 s = 5 ticks at 24 kHz
    gen = continue_audio(model, prompt, 48_000, ticks=6)
    assert len(gen.ticks) == 5 + 6
    assert len(gen.audio) == 6 * FRAME


def test_prompt_ticks_speak_the_prompt(model):
    """Teacher forcing (TickInput.forced_latent, the engine's one path): each prompt tick's agent
    audio is the vocoder's decoding of the prompt's own latents, whatever the model would sample."""
    prompt = _speechlike(0.4, 24_000)
    session = model.session(seed=0)
    n = session.prompt_agent_audio(prompt, 24_000)
    got = np.concatenate([session.step().agent_audio for _ in range(n)])
    m = model.model
    with torch.inference_mode():
        latents = m.listen(torch.from_numpy(prompt[: n * FRAME])[None]).latents
        latents = m.latent_norm.denormalize(m.latent_norm.normalize(latents))
        want, _ = m.vocoder.step(latents, m.vocoder.init_state(1))
    np.testing.assert_allclose(got, want[0].numpy(), atol=1e-4)


def test_text_in_text_out(model):
    out = text_to_text(model, "The capital of France is", max_tokens=10, seed=0)
    assert isinstance(out, str) and len(out.encode("utf-8", "replace")) <= 10 * 3
    assert out == text_to_text(model, "The capital of France is", max_tokens=10, seed=0)


def test_mixed_prompt_keeps_order(model):
    gen = mixed(model, [("text", "Doc: the shop opens at nine."), ("audio", _speechlike(0.24, 8_000), 8_000)],
                ticks=2)
    assert len(gen.ticks) == 3 + 2  # 0.24 s heard = 3 ticks, then 2 more
    with pytest.raises(ValueError, match="segment kind"):
        mixed(model, [("video", b"")])
