"""The feedback probe decodes what it says: teacher forcing reads the real latents, own feedback
reads the model's own, and the two agree exactly where the fed-back latent cannot matter."""
import numpy as np
import torch

import michi
from michi.data.shards import Utterance
from michi.eval.feedback import decodings
from michi.model.phonemes import FRAME_START, FRAMES_PER_TICK, word_phonemes
from michi.train.batches import next_phones


def _model(feedback=True):
    """The shipped model (its speak head listens to the backbone), with or without a latent input.
    Where the shipped model reads no feedback (config agent_feedback), a random input is added."""
    m = michi.load().model.eval()
    if not feedback:
        m.backbone.agent_latent_in = None
    elif m.backbone.agent_latent_in is None:
        torch.manual_seed(0)
        m.backbone.agent_latent_in = torch.nn.Linear(m.cfg.latent_dim, m.backbone.hidden_size)
    return m


def _utterance(n=12):
    rng = np.random.default_rng(0)
    frames = np.zeros((n, FRAMES_PER_TICK), np.int64)
    for t, p in enumerate(word_phonemes("hello")):
        frames[2 + t] = p
        frames[2 + t, 0] = p + FRAME_START
    return Utterance("u", "piper-joe", "hello", rng.normal(size=(n, 64)).astype(np.float32),
                     np.full(n, 260), "train", frames)


def _stream(m, u):
    """The phoneme stream the model reads: frame labels or slots."""
    return u.frames if m.cfg.phone_frames else u.phones


def test_real_is_the_decoder_and_the_first_tick_needs_no_feedback():
    m, u = _model(), _utterance()
    out = decodings(m, u, _stream(m, u), next_phones(u.frames), temperature=0.0, seed=0)
    with torch.no_grad():
        real = m.vocoder(torch.from_numpy(u.latents)[None])[0].numpy()
    np.testing.assert_allclose(out["real"], real, atol=1e-6)
    assert {k: len(v) for k, v in out.items()} == {k: 12 * 1920 for k in out}
    # Tick 0 reads no previous latent in either decoding; later ticks read different ones.
    first = slice(0, 1920 - 720)  # the decoder's delay: the first tick's own samples
    np.testing.assert_allclose(out["teacher_forced"][first], out["own_feedback"][first], rtol=1e-4, atol=1e-9)
    diff = np.abs(out["teacher_forced"] - out["own_feedback"]).max()
    assert diff > 0.05 * np.abs(out["teacher_forced"]).max()


def test_without_a_latent_input_both_decodings_are_the_same():
    m, u = _model(feedback=False), _utterance()
    out = decodings(m, u, _stream(m, u), next_phones(u.frames), temperature=0.0, seed=0)
    # one model, two batch shapes: float32 rounding differs, and the voiced decoder's harmonics
    # multiply it in the phase, so compare the audio's norms (a wrong decoding is off by ~100 %)
    a, b = out["own_feedback"], out["teacher_forced"]
    assert np.linalg.norm(a - b) < 1e-3 * np.linalg.norm(b)
