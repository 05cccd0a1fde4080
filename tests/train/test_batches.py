"""Batches: the agent inputs of each tick are the targets of the tick before (teacher forcing)."""
import numpy as np
import torch

from michi.data.shards import Utterance, write_manifest, write_shard
from michi.model.tokenizer import ByteTokenizer
from michi.train.batches import SequenceBank, TextBank


def _corpus(tmp_path, lengths=(5, 9, 3)):
    utts = []
    for i, n in enumerate(lengths):
        latents = np.arange(n * 2, dtype=np.float32).reshape(n, 2) + 100 * i
        tokens = np.arange(n) + 10 * i
        utts.append(Utterance(f"u{i}", "s", "t", latents, tokens))
    write_shard(tmp_path / "shards/train-0.safetensors", utts)
    write_manifest(tmp_path, {"shards": [{"path": "shards/train-0.safetensors", "split": "train"}]})
    return utts


def test_previous_tick_is_the_input(tmp_path):
    _corpus(tmp_path)
    bank = SequenceBank(tmp_path, pad_token=-7)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        b = bank.batch(4, max_ticks=4, gen=gen)
        for row in range(4):
            n = int(b.mask[row].sum())
            toks = b.tokens[row, :n]
            # Every utterance's tokens count up by one, so the previous tick's target is token - 1.
            valid = b.prev_valid[row, :n]
            assert (b.prev_tokens[row, :n][valid] == toks[valid] - 1).all()
            assert torch.allclose(b.prev_latents[row, :n][valid], b.latents[row, :n][valid] - 2)
            # Only the first tick of an utterance has no previous tick.
            assert (~valid).sum() == int(toks[0] % 10 == 0)
            assert (b.prev_tokens[row, :n][~valid] == -7).all()
            assert not b.mask[row, n:].any()


def test_text_windows_start_with_bos():
    bank = TextBank(["hello world", "second passage"], ByteTokenizer(), bos=300, eos=301)
    ids, mask = bank.batch(3, max_tokens=8, gen=torch.Generator().manual_seed(1), pad=256)
    assert ids.shape == (3, 9) and mask.all() and (ids[:, 0] == 300).all()
    stream = b"hello world\xffsecond passage\xff"  # 0xff stands in for EOS, after every passage
    for row in ids[:, 1:].tolist():
        assert bytes(255 if t == 301 else t for t in row) in stream


def test_packed_rows_are_full_and_keep_each_utterance_whole(tmp_path):
    _corpus(tmp_path)
    bank = SequenceBank(tmp_path, pad_token=-7)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        b = bank.batch(3, max_ticks=12, gen=gen, pack=True)
        assert b.mask.shape == (3, 12) and b.mask.all()  # no padding
        for row in range(3):
            toks = b.tokens[row].tolist()
            starts = [t for t, v in enumerate(b.prev_valid[row].tolist()) if not v]
            # A tick without a previous one starts an utterance: its token ends in 0 (tokens count
            # up from 10 * index); the previous tick is the input everywhere else.
            assert all(toks[t] % 10 == 0 for t in starts)
            valid = b.prev_valid[row]
            assert (b.prev_tokens[row][valid] == b.tokens[row][valid] - 1).all()
            # Between starts the ticks run on within one utterance (only the row's end cuts one).
            for t in range(1, 12):
                if t not in starts:
                    assert toks[t] == toks[t - 1] + 1


def test_phoneme_stream_and_advance_targets_in_both_shapes(tmp_path):
    """The same shard feeds a slot model (phonemes begun per tick, and how many the next tick
    takes) and a frame model (the 8 frame labels, and which of the next tick's frames begin one)."""
    from michi.model.phonemes import FRAME_START

    n = 6
    frames = np.zeros((n, 8), np.int64)
    frames[1, 2:] = 5
    frames[1, 2] += FRAME_START
    frames[2, :] = 5
    frames[2, 4] = 7 + FRAME_START
    frames[2, 5:] = 7
    frames[3, 0] = FRAME_START  # silence begins
    utt = Utterance("u", "s", "t", np.zeros((n, 2), np.float32), np.arange(n), frames=frames)
    write_shard(tmp_path / "shards/train-0.safetensors", [utt])
    write_manifest(tmp_path, {"shards": [{"path": "shards/train-0.safetensors", "split": "train"}]})
    gen = torch.Generator().manual_seed(0)
    slots = SequenceBank(tmp_path).batch(1, max_ticks=n, gen=gen)
    assert slots.phones[0, :4].tolist() == [[0, 0, 0, 0], [5, 0, 0, 0], [7, 0, 0, 0], [0, 0, 0, 0]]
    assert slots.phone_take[0].tolist() == [1, 1, 0, 0, 0, 0] and slots.next_phone[0].tolist() == [5, 7, 0, 0, 0, 0]
    framed = SequenceBank(tmp_path).batch(1, max_ticks=n, gen=gen, phone_frames=True)
    assert torch.equal(framed.phones[0], torch.from_numpy(frames))
    assert framed.phone_take.dtype == torch.float32 and framed.phone_take.shape == (1, n, 8)
    assert torch.equal(framed.phone_take[0, :-1], torch.from_numpy(frames[1:] >= FRAME_START).float())
    assert not framed.phone_take[0, -1].any()
