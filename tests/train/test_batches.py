"""Batches: the agent inputs of each tick are the targets of the tick before (teacher forcing)."""
import numpy as np
import torch

from michi.data.shards import Utterance, write_manifest, write_shard
from michi.train.batches import SequenceBank, TextBank
from michi.model.tokenizer import ByteTokenizer


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
    utts = _corpus(tmp_path)
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
