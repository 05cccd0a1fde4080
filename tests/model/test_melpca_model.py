"""The mel-PCA codec as a model's codec (`codec: melpca`, the `tiny-melpca` preset): the Session, the
checkpoint, the stage streams, and old configs that predate the choice."""
import json
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

import michi
from michi.api import UNTRAINED_WARNING
from michi.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_config, save_checkpoint
from michi.config import MichiConfig, preset, tiny
from michi.model.melpca import TICK, TICK_DIM, MelPCADecoder, MelPCAEncoder, fit_basis, tick_vectors
from michi.model.michi import MichiModel, _count
from michi.serving.execution import TorchEncoderStream, TorchVocoderStream

pytestmark = pytest.mark.skipif(shutil.which("flite") is None, reason="needs flite (apt: flite)")

SENTENCES = ["The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
             "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
             "Rice is often served in round bowls.", "The small pup gnawed a hole in the sock."]
def _says_not_fitted(messages):
    return any("NOT FITTED" in m for m in messages)


BASIS_KEYS = ("listen.mean", "listen.components", "vocoder.mean", "vocoder.components",
              "latent_norm.mean", "latent_norm.std")


@pytest.fixture(scope="module")
def clips():
    from michi.data.voices import synthesize

    return [synthesize("flite-kal16", s) for s in SENTENCES]


@pytest.fixture(scope="module")
def fitted(clips):
    """A random tiny-melpca model with a basis fit on five clips; the sixth is held out."""
    with pytest.warns(RuntimeWarning, match="NOT FITTED"):
        model = michi.load("tiny-melpca", seed=0)
    assert not model.basis_fitted and _says_not_fitted(model.warnings)
    basis = fit_basis(clips[:-1], k=64)
    model.model.set_basis(basis)
    return model, basis


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def test_preset_and_config():
    cfg = preset("tiny-melpca")
    assert (cfg.codec, cfg.latent_dim, cfg.listen_feature_dim) == ("melpca", 64, TICK_DIM)
    # the tiny backbone and speak head (sampled as the default model is); `tiny` itself is
    # unchanged (learned codec, latent 32)
    assert cfg.backbone == tiny().backbone
    assert cfg.speak_head == replace(tiny().speak_head, temperature=0.3, cfg_scale=2.5)
    assert (tiny().codec, tiny().latent_dim, tiny().listen_feature_dim) == ("learned", 32, 256)
    assert MichiConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="codec"):
        MichiConfig(codec="wavelets")
    with pytest.raises(ValueError, match="latent_dim"):
        MichiConfig(codec="melpca", latent_dim=641)
    with pytest.raises(ValueError, match="decoder"):
        MichiConfig(codec="melpca", decoder="neural")


def test_model_parts_follow_the_codec(fitted):
    model, basis = fitted
    m = model.model
    assert isinstance(m.listen, MelPCAEncoder) and isinstance(m.vocoder, MelPCADecoder)
    assert m.listen_text.feature_dim == TICK_DIM and m.listen_text.norm.normalized_shape == (TICK_DIM // 8,)  # per 10 ms frame
    counts = m.parameter_counts()
    # the encoder has nothing to train; the voiced decoder only its voicing net
    assert counts["listen"] == 0 and counts["vocoder"] == _count(m.vocoder.voicing) > 0
    assert model.basis_fitted and model.warnings == [UNTRAINED_WARNING]
    # set_basis: encoder and decoder share the basis, and latent_norm whitens with it
    for part in (m.listen, m.vocoder):
        assert torch.equal(part.mean, basis.mean) and torch.equal(part.components, basis.components)
    assert torch.equal(m.latent_norm.mean, torch.zeros(64)) and torch.equal(m.latent_norm.std, basis.std)
    with torch.device("meta"):  # `michi info` counts parameters on the meta device
        assert MichiModel(preset("tiny-melpca"), load_pretrained=False).parameter_counts() == counts


def test_session_ticks_on_the_melpca_codec(fitted, clips):
    model, basis = fitted
    session = model.session(seed=0)
    session.push_audio(clips[-1], sample_rate_hz=24_000)
    ticks = [session.step() for _ in range(6)]
    for tick in ticks:
        assert tick.agent_audio.shape == (TICK,) and tick.agent_audio.dtype == np.float32
        assert np.isfinite(tick.agent_audio).all()
    # The session's user latents are the offline encoding, whitened to about unit scale.
    audio = torch.from_numpy(clips[-1][:6 * TICK])[None]
    latents = model.model.listen(audio).latents[0]
    torch.testing.assert_close(latents, basis.project(tick_vectors(audio[0])),
                               atol=1e-3, rtol=1e-4)
    whitened = model.model.latent_norm.normalize(latents)
    assert 0.2 < float(whitened.std()) < 5.0


def test_unfitted_basis_is_flagged_where_audio_is_made():
    with pytest.warns(RuntimeWarning, match="NOT FITTED"):
        model = michi.load("tiny-melpca")
    with pytest.warns(RuntimeWarning, match="NOT FITTED"):
        model.session()
    assert _says_not_fitted(model.warnings)


def test_checkpoint_round_trip_keeps_the_basis_exactly(fitted, clips, tmp_path):
    model, _ = fitted
    path = save_checkpoint(model.model, tmp_path / "full")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]  # no new files
    cfg, _ = read_checkpoint_config(path)
    assert cfg == model.cfg and cfg.codec == "melpca"
    half = save_checkpoint(model.model, tmp_path / "half", dtype=torch.float16)  # the basis stays float32
    audio = torch.from_numpy(clips[-1])[None]
    want_latents = model.model.listen(audio).latents
    want_audio = model.model.vocoder(want_latents)
    for saved in (path, half):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = michi.load(saved)
        assert not any("NOT FITTED" in str(w.message) for w in caught)
        state = loaded.model.state_dict()
        for key in BASIS_KEYS:
            assert torch.equal(state[key], model.model.state_dict()[key]), (saved.name, key)
        latents = loaded.model.listen(audio).latents
        assert torch.equal(latents, want_latents)
        assert torch.equal(loaded.model.vocoder(latents), want_audio)


def test_stage_streams_equal_offline(fitted, clips):
    """services/listen and services/vocoder run these wrappers: chunked equals whole."""
    from services.listen.server import ListenStream

    model, _ = fitted
    m = model.model
    pcm = clips[-1][:7 * TICK + 555]
    whole = m.listen(torch.from_numpy(pcm)[None])
    encoder, stream = TorchEncoderStream(model), ListenStream(model, 24_000, TorchEncoderStream(model))
    latents, features, frames, pos = [], [], [], 0
    for size in [1, 700, 1920, 3001, 5, 4000] * 4:
        chunk = pcm[pos:pos + size]
        pos += size
        lat, feat = encoder.encode(chunk)
        assert lat.shape[1:] == (64,) and feat.shape[1:] == (TICK_DIM,)
        latents.append(lat)
        features.append(feat)
        frames += stream.push(chunk)
    assert pos >= len(pcm)
    assert _rel(torch.cat(latents), whole.latents[0]) < 1e-5
    assert _rel(torch.cat(features), whole.features[0]) < 1e-5
    assert len(frames) == 7
    assert _rel(torch.from_numpy(np.stack([f[0] for f in frames])), whole.latents[0]) < 1e-5

    vocoder = TorchVocoderStream(model)
    lat = whole.latents[0].numpy()
    out = np.concatenate([vocoder.decode(lat[:1]), vocoder.decode(lat[1:3]), vocoder.decode(lat[3:3]),
                          *[vocoder.decode(lat[i:i + 1]) for i in range(3, 7)]])
    offline = m.vocoder(whole.latents)[0].numpy()
    assert out.shape == offline.shape == (7 * TICK,)
    # 5e-4: the voiced decoder's harmonics multiply float32 rounding in its voicing net's f0
    # (1.6e-4 seen on an AMD EPYC VM for some random voicing nets)
    assert _rel(torch.from_numpy(out), torch.from_numpy(offline)) < 5e-4


def test_old_config_without_codec_loads_as_learned(tmp_path):
    torch.manual_seed(0)
    path = save_checkpoint(MichiModel(tiny()), tmp_path / "old")
    doc = json.loads((path / "config.json").read_text())
    del doc["config"]["codec"]  # as written before the codec could be chosen
    (path / "config.json").write_text(json.dumps(doc))
    model, _ = load_checkpoint(path)
    assert model.cfg.codec == "learned" and model.basis_fitted
    learned = michi.DEFAULT_MODEL.parent / "michi-tiny-learned"  # written before the codec key existed
    shipped, _ = read_checkpoint_config(learned)
    assert "codec" not in json.loads((learned / "config.json").read_text())["config"]
    assert shipped.codec == "learned"
    doc["config"]["codec"] = "wavelets"
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="codec"):
        load_checkpoint(path)
