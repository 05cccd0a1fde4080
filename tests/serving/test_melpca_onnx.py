"""The mel-PCA codec (`codec: melpca`) on the graph executions: its listen encoder and voiced
decoder steps export to ONNX (`michi triton export`) and, run through ONNX Runtime one 80 ms frame
at a time with the state passed in and out, give what the PyTorch streaming steps give: one
stream over a whole utterance, and a batch whose rows are at different positions."""
import shutil

import numpy as np
import pytest
import torch

from michi.api import Michi
from michi.config import preset
from michi.model.melpca import TICK, fit_basis
from michi.model.michi import MichiModel
from michi.model.state import state_tensors
from michi.serving.execution import OnnxStep, TorchEncoderStream, TorchVocoderStream, encoder_streams, vocoder_streams
from michi.serving.triton.export import MODELS, ONNX_FILE, initial_state, write_repository

pytestmark = pytest.mark.skipif(shutil.which("flite") is None, reason="needs flite (apt: flite)")



def assert_near(actual, desired, rel: float = 1e-2) -> None:
    """The voiced decoder's harmonics multiply a phase error by up to 100, and its phase
    accumulates f0 over the stream, so float32 rounding differences between ONNX Runtime and
    PyTorch (in the voicing net's f0, in cos) grow to about 1e-3 of the signal: compare norms."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape
    assert np.linalg.norm(actual - desired) <= rel * np.linalg.norm(desired) + 1e-4

SENTENCES = ["The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
             "It's easy to tell the depth of a well.", "Rice is often served in round bowls."]


@pytest.fixture(scope="module")
def speech():
    from michi.data.voices import synthesize

    return [synthesize("flite-kal16", s) for s in SENTENCES]


@pytest.fixture(scope="module")
def model(speech):
    """A random tiny-melpca model whose basis is fit on three sentences (the fourth is held out)."""
    torch.manual_seed(0)
    m = MichiModel(preset("tiny-melpca"), load_pretrained=False)
    m.set_basis(fit_basis(speech[:-1], k=m.cfg.latent_dim))
    return Michi(m)


@pytest.fixture(scope="module")
def repository(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("melpca-repo")
    specs = write_repository(model, out, max_batch_size=8)
    return out, specs


def _step(repository, stage: str) -> OnnxStep:
    out, specs = repository
    return OnnxStep(out / MODELS[stage] / "1" / ONNX_FILE, specs[stage])


def test_graph_state_is_float_and_fresh_streams_are_zeros(model, repository):
    """The graph executions start a stream with zeros of the declared types (OnnxStep, TritonStep):
    the codec's fresh state must be exactly that."""
    _, specs = repository
    for stage in MODELS:
        states = [t for t in specs[stage].inputs if t.name.startswith("state_in_")]
        fresh = initial_state(model, stage, 2)
        assert [(t.dims, t.dtype) for t in states] == [(tuple(f.shape[1:]), torch.float32) for f in fresh]
        assert all(not f.any() for f in fresh)
    # OLA tail, frame counter; the voiced decoder's phase, excitation tail and voicing-net buffers
    net = model.cfg.voicing
    buffers = [(80 if i == 0 else net.width, 2 * d) for i, d in enumerate(net.dilations)]
    assert [t.dims for t in specs["vocoder"].inputs[1:]] == [(720,), (1,), (1,), (720,), *buffers]


def test_streams_on_onnxruntime_equal_torch_over_an_utterance(model, repository, speech):
    """`--execution onnxruntime` (the stages' encoder and vocoder streams), chunked at odd sizes,
    against the PyTorch streams over a held-out sentence (3.7 s, 45 ticks)."""
    out, _ = repository
    pcm = speech[-1]
    graph, torch_stream = encoder_streams(model, "onnxruntime", onnx_dir=str(out))(), TorchEncoderStream(model)
    got, want, pos = [], [], 0
    for size in [700, 1920, 3001, 5, 4000] * 20:
        chunk = pcm[pos:pos + size]
        pos += size
        got.append(graph.encode(chunk))
        want.append(torch_stream.encode(chunk))
    assert pos >= len(pcm)
    latents = torch.cat([g[0] for g in got])
    assert latents.shape == (len(pcm) // TICK, model.cfg.latent_dim) and len(latents) > 40
    torch.testing.assert_close(latents, torch.cat([w[0] for w in want]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([g[1] for g in got]), torch.cat([w[1] for w in want]),
                               atol=1e-4, rtol=1e-4)

    lat = latents.numpy()
    graph, torch_stream = vocoder_streams(model, "onnxruntime", onnx_dir=str(out))(), TorchVocoderStream(model)
    cuts = [0, 1, 3, 3, 10, len(lat)]
    audio = np.concatenate([graph.decode(lat[a:b]) for a, b in zip(cuts, cuts[1:])])
    reference = np.concatenate([torch_stream.decode(lat[a:b]) for a, b in zip(cuts, cuts[1:])])
    assert audio.shape == (len(lat) * TICK,) and np.sqrt(np.mean(reference ** 2)) > 1e-2
    assert_near(audio, reference)


def test_batched_rows_at_different_positions_equal_torch(model, repository, speech):
    """Two streams in one batch; the second starts 3 ticks after the first (its state rows
    fresh), as a Triton batch mixes frames of calls at different points. Each frame's outputs and
    new state equal the PyTorch step with `state.reset` on that row."""
    late, ticks = 3, 12
    pcm = np.stack([speech[0][:ticks * TICK], speech[1][:ticks * TICK]])
    rows = torch.tensor([False, True])

    listen, m = _step(repository, "listen"), model.model
    state, reference = listen.init_state(2), m.listen.init_state(2)
    latents = []
    with torch.no_grad():
        for tick in range(ticks):
            if tick == late:
                fresh = listen.init_state(1)
                state = [np.concatenate([s[:1], f]) for s, f in zip(state, fresh)]
                reference.reset(rows)
            audio = pcm[:, tick * TICK:(tick + 1) * TICK]
            (latent, features), state = listen({"audio": audio}, state)
            want, reference = m.listen.step(torch.from_numpy(audio), reference)
            np.testing.assert_allclose(latent, want.latents[:, 0].numpy(), atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(features, want.features[:, 0].numpy(), atol=1e-4, rtol=1e-4)
            for s, r in zip(state, state_tensors(reference)):
                np.testing.assert_allclose(s, r.numpy(), atol=1e-6)
            latents.append(latent)

    vocoder = _step(repository, "vocoder")
    state, reference = vocoder.init_state(2), m.vocoder.init_state(2)
    with torch.no_grad():
        for tick, latent in enumerate(latents):
            if tick == late:
                state = [np.concatenate([s[:1], f]) for s, f in zip(state, vocoder.init_state(1))]
                reference.reset(rows)
            (audio,), state = vocoder({"latent": latent}, state)
            want, reference = m.vocoder.step(torch.from_numpy(latent)[:, None], reference)
            assert_near(audio, want.numpy())
            for s, r in zip(state, state_tensors(reference)):
                assert_near(s, r.numpy())
    assert state[1][:, 0].tolist() == [8 * ticks, 8 * (ticks - late)]  # the rows' frame counters


@pytest.mark.parametrize("name", ["tiny-whisper", "tiny-mel-whisper"])
def test_whisper_front_listen_step_equals_torch(speech, tmp_path, name):
    """A `tiny-whisper` model's listen step (the Whisper front, its key/value cache and frame
    counter in the state), or one with the log-mel beside it, exports too: two rows, the second
    starting 3 ticks late, give the features of the PyTorch step with `state.reset` on that row."""
    from michi.serving.triton.export import export_onnx

    torch.manual_seed(0)
    m = MichiModel(preset(name), load_pretrained=False)
    m.set_basis(fit_basis(speech[:-1], k=m.cfg.latent_dim))
    spec = export_onnx(Michi(m), "listen", tmp_path / ONNX_FILE, max_batch_size=4)
    listen = OnnxStep(tmp_path / ONNX_FILE, spec)
    late, ticks = 3, 8
    pcm = np.stack([speech[0][:ticks * TICK], speech[1][:ticks * TICK]])
    state, reference = listen.init_state(2), m.listen.init_state(2)
    with torch.no_grad():
        for tick in range(ticks):
            if tick == late:
                state = [np.concatenate([s[:1], f]) for s, f in zip(state, listen.init_state(1))]
                reference.reset(torch.tensor([False, True]))
            audio = pcm[:, tick * TICK:(tick + 1) * TICK]
            (_, features), state = listen({"audio": audio}, state)
            want, reference = m.listen.step(torch.from_numpy(audio), reference)
            assert features.shape == (2, m.cfg.listen_feature_dim)
            # after 4 attention layers (frames up to ~10) a few elements move by ~1e-3 across CPUs
            np.testing.assert_allclose(features, want.features[:, 0].numpy(), atol=3e-3, rtol=1e-3)
