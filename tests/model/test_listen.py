"""Listen encoder and CTC text head: shapes, streaming == offline for any chunking, resets, CTC."""
import dataclasses

import pytest
import torch

from michi.config import FRAME_SAMPLES, ListenConfig, tiny
from michi.model.listen import PHONE_SLOTS_PER_FRAME, ListenEncoder, ListenTextHead, WindowedSelfAttention
from michi.model.phonemes import NUM_PHONEME_IDS


def full_like():
    """The full preset's structure (transformer on, window exercised) at a size that tests quickly."""
    return dataclasses.replace(tiny(), latent_dim=16, listen=ListenConfig(
        channels=4, strides=(6, 5, 8, 8), residual_layers=2, max_channels=32, transformer_layers=1,
        transformer_dim=32, transformer_heads=4, attention_window=3, text_slots=2))


CONFIGS = {"tiny": tiny, "full_like": full_like}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def make(name):
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    return cfg, ListenEncoder(cfg).eval()


def stream(encoder, audio, sizes):
    state = encoder.init_state(audio.shape[0])
    latents, features, start = [], [], 0
    for size in sizes:
        out, state = encoder.step(audio[:, start:start + size], state)
        latents.append(out.latents)
        features.append(out.features)
        start += size
    return torch.cat(latents, 1), torch.cat(features, 1)


def chunk_sizes(total, gen, low, high):
    sizes = []
    while sum(sizes) < total:
        sizes.append(min(total - sum(sizes), int(torch.randint(low, high + 1, (), generator=gen))))
    return sizes


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes(name):
    cfg, encoder = make(name)
    with torch.inference_mode():
        latents, features = encoder(torch.randn(2, 3 * FRAME_SAMPLES + 500))
    assert latents.shape == (2, 3, cfg.latent_dim)
    assert features.shape == (2, 3, encoder.feature_dim)


@pytest.mark.parametrize("name", CONFIGS)
def test_chunked_equals_offline(name):
    cfg, encoder = make(name)
    # 8 frames and a partial one: with a 3-frame window the attention cache wraps several times.
    audio = torch.randn(2, 8 * FRAME_SAMPLES + 700) * 0.3
    gen = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        ref_latents, ref_features = encoder(audio)
        assert ref_latents.shape[1] == 8
        length = audio.shape[1]
        for sizes in ([1000] * 16 + [length - 16000], [1337] * 12 + [length - 16044],
                      chunk_sizes(length, gen, 0, 4000), chunk_sizes(length, gen, 1, 300),
                      [FRAME_SAMPLES] * 8 + [700]):
            latents, features = stream(encoder, audio, sizes)
            assert latents.shape == ref_latents.shape, sizes
            assert rel_err(latents, ref_latents) < 1e-5, sizes
            assert rel_err(features, ref_features) < 1e-5, sizes


@pytest.mark.parametrize("name", CONFIGS)
def test_one_sample_at_a_time(name):
    cfg, encoder = make(name)
    audio = torch.randn(1, 2 * FRAME_SAMPLES) * 0.3
    with torch.inference_mode():
        ref_latents, _ = encoder(audio)
        latents, _ = stream(encoder, audio, [1] * audio.shape[1])
    assert rel_err(latents, ref_latents) < 1e-5


def test_frames_come_out_when_complete():
    cfg, encoder = make("tiny")
    with torch.inference_mode():
        state = encoder.init_state(1)
        out, _ = encoder.step(torch.randn(1, FRAME_SAMPLES - 1), state)
        assert out.latents.shape == (1, 0, cfg.latent_dim)
        out, _ = encoder.step(torch.randn(1, 1), state)
        assert out.latents.shape == (1, 1, cfg.latent_dim)
        out, _ = encoder.step(torch.randn(1, 0), state)
        assert out.latents.shape == (1, 0, cfg.latent_dim)


def test_attention_window_limits_context():
    torch.manual_seed(0)
    attn = WindowedSelfAttention(8, 2, window=3).eval()
    x = torch.randn(1, 6, 8)
    y = x.clone()
    y[:, 1] += 1.0
    with torch.inference_mode():
        a, b = attn(x), attn(y)
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert not torch.allclose(a[:, 1:4], b[:, 1:4])  # frames 1..3 see frame 1
    torch.testing.assert_close(a[:, 4:], b[:, 4:])  # frame 4 sees 2..4 only


@pytest.mark.parametrize("name", CONFIGS)
def test_reset_row_equals_fresh_stream(name):
    cfg, encoder = make(name)
    before, after = torch.randn(2, 4 * FRAME_SAMPLES) * 0.3, torch.randn(2, 3 * FRAME_SAMPLES) * 0.3
    with torch.inference_mode():
        state = encoder.init_state(2)
        encoder.step(before, state)
        state.reset(torch.tensor([False, True]))
        out, _ = encoder.step(after, state)
        fresh = encoder(after[1:])
        carried = encoder(torch.cat([before, after], 1))
    torch.testing.assert_close(out.latents[1:], fresh.latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.latents[:1], carried.latents[:1, -3:], rtol=1e-4, atol=1e-5)


def test_reset_mid_frame_is_refused_and_changes_nothing():
    cfg, encoder = make("tiny")
    audio = torch.randn(2, 2 * FRAME_SAMPLES) * 0.3
    with torch.inference_mode():
        state = encoder.init_state(2)
        encoder.step(audio[:, :1000], state)
        with pytest.raises(ValueError, match="frame boundary"):
            state.reset(torch.tensor([True, False]))
        out, _ = encoder.step(audio[:, 1000:], state)
        ref = encoder(audio)
    assert rel_err(out.latents, ref.latents) < 1e-5


def test_forward_trains():
    cfg, encoder = make("full_like")
    encoder.train()
    latents, features = encoder(torch.randn(2, 3 * FRAME_SAMPLES))
    (latents.square().mean() + features.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())


def test_text_head_streams_like_offline():
    cfg = full_like()
    torch.manual_seed(0)
    head = ListenTextHead(cfg, text_vocab_size=11).eval()
    features = torch.randn(2, 6, cfg.listen.transformer_dim)
    with torch.inference_mode():
        ref = head(features)
        assert ref.shape == (2, 6, cfg.listen.text_slots, 12)
        state = head.init_state(2)
        parts = [head.step(features[:, i:j], state)[0] for i, j in ((0, 1), (1, 1), (1, 4), (4, 6))]
    assert rel_err(torch.cat(parts, 1), ref) < 1e-5


def test_a_head_of_two_feature_parts_streams_and_starts_as_its_first():
    """"mel+whisper" features (log-mel, then Whisper frames) pass each part's own convs: fed a few
    ticks at a time the head equals offline; new, its second part adds nothing, so a one-part
    head's weights (here a "mel" head's) give the same logits; once changed, the second part counts."""
    from michi.config import preset

    torch.manual_seed(0)
    mel, both = preset("tiny-melpca"), preset("tiny-mel-whisper")
    assert [p[0] for p in both.listen_feature_parts] == ["mel", "whisper"] and both.listen_feature_dim == 640 + 1536
    one, two = ListenTextHead(mel, text_vocab_size=11).eval(), ListenTextHead(both, text_vocab_size=11).eval()
    assert two.load_state_dict(one.state_dict(), strict=False).unexpected_keys == []
    features = torch.randn(2, 6, both.listen_feature_dim)
    with torch.inference_mode():
        ref = two(features)
        assert torch.allclose(ref, one(features[..., :640]), atol=1e-5)
        state = two.init_state(2)
        parts = [two.step(features[:, i:j], state)[0] for i, j in ((0, 1), (1, 1), (1, 4), (4, 6))]
        assert rel_err(torch.cat(parts, 1), ref) < 1e-5
        torch.nn.init.normal_(two.front2[-2].weight)
        changed = two(features)
        moved = features.clone()
        moved[..., 640:] += torch.randn(2, 6, 1536)
        assert not torch.allclose(changed, ref, atol=1e-3) and not torch.allclose(two(moved), changed, atol=1e-3)


def test_phoneme_output_streams_like_offline():
    """The head's phoneme CTC slots (`phone_logits` of its frames), fed a few ticks at a time,
    equal those of the whole input."""
    cfg = tiny()
    torch.manual_seed(0)
    head = ListenTextHead(cfg, text_vocab_size=11).eval()
    features = torch.randn(2, 6, cfg.listen.transformer_dim)
    with torch.inference_mode():
        ref = head.phone_logits(head.hidden(features))
        assert ref.shape == (2, 6 * head.out_frames * PHONE_SLOTS_PER_FRAME, NUM_PHONEME_IDS + 1)
        state = head.init_state(2)
        parts = [head.phone_logits(head.hidden(features[:, i:j], state)) for i, j in ((0, 1), (1, 4), (4, 6))]
    assert rel_err(torch.cat(parts, 1), ref) < 1e-5
    cfg.listen.phone_ctc = False
    with pytest.raises(ValueError, match="no phoneme output"):
        ListenTextHead(cfg, text_vocab_size=11).phone_logits(torch.zeros(1, 2, cfg.listen.text_dim))


def test_ctc_loss_decreases_on_a_fixed_target():
    cfg = tiny()
    cfg.listen.phone_ctc = False  # the byte slots alone (and the random draws this fit was tuned on)
    torch.manual_seed(0)
    head = ListenTextHead(cfg, text_vocab_size=20)
    features = torch.randn(2, 5, cfg.listen.transformer_dim)
    targets = torch.tensor([[3, 3, 7, 1, 9, 2, 2, 5], [4, 8, 8, 8, 0, 0, 0, 0]])
    lengths = torch.tensor([8, 4])
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = head.ctc_loss(head(features), targets, lengths)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
    # Trained to fit, greedy decoding of the streamed frames reads the targets back.
    with torch.no_grad():
        logits = head(features)
    last = head.initial_last_token(2)
    decoded = [[], []]
    for frame in range(logits.shape[1]):
        tokens, last = head.greedy_step(logits[:, frame], last)
        for row in range(2):
            decoded[row] += [t for t in tokens[row].tolist() if t >= 0]
    assert decoded == [[3, 3, 7, 1, 9, 2, 2, 5], [4, 8, 8, 8]]


def test_ctc_loss_respects_frame_lengths():
    cfg = tiny()
    head = ListenTextHead(cfg, text_vocab_size=5)
    logits = torch.randn(2, 4, cfg.listen.text_slots, 6)
    targets, lengths = torch.tensor([[1, 2], [3, 0]]), torch.tensor([2, 1])
    full = head.ctc_loss(logits, targets, lengths)
    changed = logits.clone()
    changed[1, 3] += 5.0  # past row 1's valid frames
    short = head.ctc_loss(logits, targets, lengths, frame_lengths=torch.tensor([4, 3]))
    short_changed = head.ctc_loss(changed, targets, lengths, frame_lengths=torch.tensor([4, 3]))
    assert torch.isfinite(full) and torch.isclose(short, short_changed)


def test_greedy_step_collapses_across_frames():
    cfg = dataclasses.replace(tiny(), listen=dataclasses.replace(tiny().listen, text_slots=3))
    head = ListenTextHead(cfg, text_vocab_size=4)  # tokens 0..3, blank 4
    blank = head.blank

    def frame(*rows):
        logits = torch.full((len(rows), 3, 5), -10.0)
        for r, labels in enumerate(rows):
            for s, label in enumerate(labels):
                logits[r, s, label] = 10.0
        return logits

    frames = [frame([1, 1, blank], [2, 2, 2]),
              frame([1, 3, 3], [2, blank, 2]),
              frame([3, blank, blank], [blank, 0, 0]),
              frame([blank, 3, 1], [0, 0, 1])]
    last = head.initial_last_token(2)
    emitted = []
    for logits in frames:
        tokens, last = head.greedy_step(logits, last)
        emitted.append(tokens.tolist())
    assert emitted == [
        [[1, -1, -1], [2, -1, -1]],
        [[1, 3, -1], [-1, -1, 2]],  # row 0: blank then 1 -> a new 1; row 1: 2 repeats across frames
        [[-1, -1, -1], [-1, 0, -1]],  # row 0: 3 repeats across the frame boundary
        [[-1, 3, 1], [-1, -1, 1]],  # row 1: 0 repeats across frames
    ]
    assert last.tolist() == [1, 1]
