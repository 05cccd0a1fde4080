"""The voicing stage: the voiced decoder's voicing net learns f0 and voicing on real (espeak-ng)
speech, through the telephone channel it is trained with."""
import numpy as np
import torch

from michi.audio.augment import telephone
from michi.config import preset
from michi.model.michi import MichiModel
from michi.train.basis import BasisConfig, run_basis_stage
from michi.train.batches import AudioBank, load_segments, read_audio
from michi.train.stages import OptimConfig
from michi.train.voicing import VoicingConfig, VoicingStage


def test_telephone_channel_cuts_the_band_above_4_khz():
    rng = np.random.default_rng(0)
    noise = rng.uniform(-0.5, 0.5, 24_000).astype(np.float32)
    out = telephone(noise)
    assert out.shape == noise.shape and out.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(out)) ** 2
    freqs = np.fft.rfftfreq(len(out), 1 / 24_000)
    assert spectrum[freqs > 4500].sum() < 1e-3 * spectrum[freqs < 3500].sum()
    # mu-law keeps a loud signal within about 2 % rms of what the band limit alone leaves
    from scipy.signal import resample_poly

    banded = resample_poly(resample_poly(noise, 1, 3), 3, 1)[:len(noise)]
    assert np.sqrt(np.mean((out - banded) ** 2)) < 0.05 * np.sqrt(np.mean(banded ** 2))


def test_voicing_stage_learns_on_real_speech(mini_corpus, tmp_path):
    torch.manual_seed(0)
    model = MichiModel(preset("tiny-melpca"), load_pretrained=False)
    run_basis_stage(model, mini_corpus, tmp_path / "basis", BasisConfig(max_minutes=0.25), progress=lambda _: None)
    bank = AudioBank(mini_corpus, load_segments(mini_corpus))
    heldout = [a / 32768.0 for a in read_audio(mini_corpus, load_segments(mini_corpus, ("heldout_sentence",))[:3])]
    stage = VoicingStage(model, bank, VoicingConfig(batch_size=4, ticks=8, eval_every=30),
                         OptimConfig(lr=3e-3, warmup_steps=5), heldout=heldout)
    assert float(model.vocoder.voicing.in_std.mean()) != 1.0  # input statistics set from the corpus
    losses = [stage.step(i) for i in range(60)]
    for key in ("loss", "log_f0_l1", "voicing_bce"):
        first = np.mean([l[key] for l in losses[:10]])
        last = np.mean([l[key] for l in losses[-10:]])
        assert last < 0.85 * first, (key, first, last)
    assert np.mean([l["voicing_accuracy"] for l in losses[-10:]]) > 0.7
    # the held-out clips' figures, every eval_every steps
    assert [i for i, l in enumerate(losses) if "heldout_f0_agreement" in l] == [29, 59]
    assert 0.5 < losses[-1]["heldout_voicing_accuracy"] <= 1 and 0 <= losses[-1]["heldout_f0_agreement"] <= 1
