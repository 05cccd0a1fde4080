"""The `hearing` stage: the listen text head (`michi.model.listen.ListenTextHead`) learns streaming
CTC over the listen encoder's features, the encoder frozen (a mel-PCA encoder has nothing to train).

Every training voice of the corpus, plus the Asterisk prompts of the "train" part
(`michi.eval.speech.asterisk_split`: one human speaker on a telephone line; the other part is held
out by prompt text and never seen here). Each clip passes a random channel
(`michi.audio.augment.channel`: speed, room, noise or another voice, telephone line, level); on the
features, the mel axis is warped (vocal tract length perturbation: a pitch and formant shift
without a tempo change) and SpecAugment masks a few bands and stretches of time. Targets: the
normalised transcript (`michi.eval.wer.normalize_text`: lower-case words, no punctuation) as
tokens. Every `eval_every` steps the held-out word error rates (a held-out voice, held-out Asterisk
prompts, both through the telephone line) go into the loss log: the stage's learning curve
(`plot_curve`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..audio.augment import SPEEDS, ChannelConfig, channel, speed, telephone
from ..config import FRAME_SAMPLES, SAMPLE_RATE_HZ, TICK_S
from ..data.align import word_phone_times
from ..data.whisper import ENCODER_FRAME_S, encoder_frames, load_whisper, streaming_encoder_frames
from ..eval.wer import ErrorCounts, align, normalize_text, summary
from ..model.lexicon import PHONE_DECODER, Lexicon
from ..model.listen import collapse, emitted
from ..model.michi import MichiModel
from ..model.phonemes import NO_PHONE, NUM_PHONEME_IDS, ctc_phonemes
from ..model.state import load_state_tensors, state_tensors
from ..model.textlm import CharLM
from ..model.whisper_encoder import FRAME_SAMPLES_24K, WhisperEncoder, WhisperFront
from ..model.wordlm import WordLM
from ..transcript import TAIL_TICKS, with_tail
from .stages import OptimConfig, _adamw, _apply, bf16_native, keep_heap_compact

LM_DECODER = {"alpha": 0.8, "beta": 2.0, "beam": 8, "blank_skip": 0.95, "settle": 10}  # the card: dev-set sweeps


@dataclass
class Clip:
    audio: np.ndarray  # float32, 24 kHz
    text: str  # normalised
    phones: list[tuple[int, float]] | None = None  # (phoneme id, start s) where known
    teacher: np.ndarray | None = None  # [head frames, width] float16: `attach_teacher`'s frames
    features: np.ndarray | None = None  # [ticks, F] float16: the listen features of one channel draw
    ratio: float = 1.0  # the draw's speed: its length over the clip's (its phoneme times scale by it)
    draws: list[Clip] | None = None  # the clip's precomputed channel draws (`HearingStage.precompute`)
    lead: int = 0  # a draw's: which of `feature_leads_s` its features follow


@dataclass
class HearingConfig:
    batch_size: int = 24
    max_seconds: float = 8.0  # longer clips are cut (their text at the last whole word)
    asterisk: float = 0.25  # share of rows from the Asterisk "train" prompts (when given)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    vtlp: float = 0.5  # share of rows whose mel axis is warped
    vtlp_range: tuple[float, float] = (0.88, 1.12)
    freq_masks: int = 2
    freq_mask_bins: int = 8  # of 80
    time_masks: int = 2
    time_mask_frames: int = 15  # of 10 ms
    # The auxiliary loss: each head frame also classifies the phoneme sounding one frame before
    # it (dense targets from the corpus's phoneme timings: piper's own, or each word's phonemes
    # spread over its span), so the head learns sounds before it can spell; 0: none.
    phone_weight: float = 1.0
    phone_delay_frames: int = 1
    # Distillation: each head frame also predicts (by cosine) Whisper tiny.en's encoder output
    # of the clean clip (`attach_teacher`: a head frame's 40 ms averaged), `distill_delay_frames`
    # before it: a teacher that has heard many speakers, and no noise or telephone line, shows
    # what stays the same across voices and channels; 0: none.
    distill: float = 0.0
    distill_delay_frames: int = 1
    # The weight of the head's phoneme CTC (`ListenTextHead.phone_logits`, where the head has one):
    # each text's words as phonemes (`michi.model.phonemes.ctc_phonemes`), beside the byte CTC.
    phone_ctc: float = 1.0
    # A Whisper front's features are computed once per clip (`HearingStage.precompute`): this many
    # channel draws of each corpus clip, and of each Asterisk prompt (few prompts, many rows).
    feature_draws: int = 1
    asterisk_feature_draws: int = 8
    # Seconds of silence a draw's features may follow (one picked per draw): the front's state
    # after it (its positions and cache), as for a caller who speaks later in a call.
    feature_leads_s: tuple[float, ...] = (0.0,)
    # A tuned Whisper front's (`listen.whisper_tuned`) learning rate, relative to the head's: its
    # layers start trained, on whole 30 s windows, and are only adapted to the stream.
    front_lr_scale: float = 0.1
    eval_every: int = 250


def clips_from_items(items, limit: int | None = None) -> list[Clip]:
    """`michi.eval.speech.SpeechItem`s (any rate) -> clips at 24 kHz with normalised text."""
    return [Clip(it.audio(SAMPLE_RATE_HZ), normalize_text(it.text)) for it in items[:limit]]


def clips_from_bank(bank) -> list[Clip]:
    """An `AudioBank`'s segments -> clips (cut at no length; `HearingStage` cuts), with their
    phoneme timings: the segment's own, or spread over its word times."""
    return [Clip((a / 32768.0).astype(np.float32), normalize_text(seg["text"]), _phones(seg))
            for a, seg in zip(bank.audio, bank.segments) if normalize_text(seg["text"])]


def _phones(segment: dict) -> list[tuple[int, float]] | None:
    if segment.get("phones"):
        return [(int(p), float(t)) for p, t in segment["phones"]]
    words = segment.get("words")
    return word_phone_times([(w, float(s), float(e)) for w, s, e in words]) if words else None


def phone_labels(phones: list[tuple[int, float]], offset_s: float, ratio: float, seconds: float,
                 rate_hz: float, delay_frames: int, out: np.ndarray) -> None:
    """Write into `out` (one label per frame at rate_hz) the phoneme sounding `delay_frames`
    before each frame's centre, for a clip placed at offset_s and sped to 1/ratio of its length
    (its own times scale by ratio)."""
    starts = np.array([t for _, t in phones]) * ratio + offset_s
    ids = np.array([p for p, _ in phones])
    first, last = int(offset_s * rate_hz), min(len(out), int(np.ceil((offset_s + seconds) * rate_hz)))
    centres = (np.arange(first, last) + 0.5 - delay_frames) / rate_hz
    index = np.searchsorted(starts, centres, side="right") - 1
    out[first:last] = np.where(index >= 0, ids[np.maximum(index, 0)], NO_PHONE)


def _concatenated(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC targets: the rows concatenated, and their lengths."""
    return (torch.tensor([t for row in rows for t in row], dtype=torch.long),
            torch.tensor([len(row) for row in rows], dtype=torch.long))


def warp_mel(frames: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Frames [..., M] of log-mel with the mel axis stretched by `factor` (a number, or a tensor
    that broadcasts against the frames, e.g. [B, 1, 1]; > 1: the spectrum moves up, as a shorter
    vocal tract's): bin i reads bin i / factor, linearly interpolated."""
    m = frames.shape[-1]
    src = (torch.arange(m, dtype=torch.float32) / torch.as_tensor(factor)).clamp(max=m - 1)
    src = src.expand(frames.shape)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=m - 1)
    w = (src - lo).to(frames.dtype)
    return frames.gather(-1, lo) * (1 - w) + frames.gather(-1, hi) * w


class HearingStage:
    name = "hearing"

    def __init__(self, model: MichiModel, train: list[Clip], hc: HearingConfig, oc: OptimConfig, tokenizer,
                 asterisk: list[Clip] | None = None, heldout: dict[str, list[Clip]] | None = None, seed: int = 0):
        """`train`: the corpus's training clips; `asterisk`: the Asterisk "train" prompts (mixed in
        at `hc.asterisk`); `heldout`: named sets whose WER is logged every `eval_every` steps."""
        if not train:
            raise ValueError("the hearing stage needs training clips")
        self.model, self.hc, self.oc, self.tokenizer = model, hc, oc, tokenizer
        self.train, self.asterisk = train, asterisk or []
        self.heldout = {name: clips for name, clips in (heldout or {}).items() if clips}
        self.head = model.listen_text
        self.head.enabled = True
        self.channel = dataclasses.replace(hc.channel, speed=0.0)  # the stage speeds clips itself
        self.modules: dict[str, torch.nn.Module] = {"listen_text": self.head}
        if hc.phone_weight > 0:  # trained beside the head, not part of the model
            self.modules["phones"] = torch.nn.Linear(self.head.out.in_features, NUM_PHONEME_IDS)
        self.distill_width = 0
        if hc.distill > 0:
            self.distill_width = attach_teacher(self.train + self.asterisk, TICK_S / self.head.out_frames)
            self.modules["distill"] = torch.nn.Linear(self.head.out.in_features, self.distill_width)
        self.optimizers = {"listen_text": _adamw([p for m in self.modules.values() for p in m.parameters()], oc)}
        # A tuned Whisper front: its features are precomputed up to its tuned layers, which train
        # here over them (`tuned_features`), each draw after its lead's cache (`leads`).
        front = getattr(model.listen, "text_front", None)
        self.front = front if front is not None and front.tuned else None
        if self.front is not None:
            self.modules["whisper_tuned"] = torch.nn.ModuleList([*front.encoder.layers[front.split:], front.encoder.norm])
            self.optimizers["listen_text"].add_param_group({"params": front.tuned_parameters(),
                                                            "lr_scale": hc.front_lr_scale})
        self.rng = torch.Generator().manual_seed(seed)
        self.autocast = bf16_native(torch.device("cpu"))
        # A Whisper front costs twice the head's own step per batch: its features (and the log-mel
        # beside them) are computed once per clip and channel draw (`precompute`), and rows are
        # packed from them.
        self.precomputed = "whisper" in model.cfg.listen.text_front.split("+")
        if self.precomputed:
            with self._stopped():
                self.leads = [self._after_silence(s) for s in hc.feature_leads_s]
                self.precompute(self.train, hc.feature_draws)
                self.precompute(self.asterisk, hc.asterisk_feature_draws)
        self.progress = 0.0
        # The next batch is drawn and augmented (numpy, scipy: mostly outside the GIL) while the
        # current one trains.
        self._pool = ThreadPoolExecutor(1)
        self._next: Future | None = None

    def _np_rng(self) -> np.random.Generator:
        return np.random.default_rng(int(torch.randint(2**62, (), generator=self.rng)))

    def _draw(self, rng: np.random.Generator) -> Clip:
        pool = self.asterisk if self.asterisk and rng.random() < self.hc.asterisk else self.train
        clip = pool[rng.integers(len(pool))]
        if clip.draws:
            clip = clip.draws[rng.integers(len(clip.draws))]
        limit = int(self.hc.max_seconds * SAMPLE_RATE_HZ)
        length = len(clip.audio) * clip.ratio
        if length <= limit:
            return clip
        # Cut at a random whole word: keep the words that end before the cut, by their share of the
        # clip (no word times here), and drop the rest of the audio.
        words = clip.text.split()
        keep = max(1, int(len(words) * limit / length) - 1)
        cut = int(len(clip.audio) * keep / len(words))
        teacher = None if clip.teacher is None else clip.teacher[:-(-cut // self._frame_samples)]
        features = None if clip.features is None else clip.features[:-(-int(cut * clip.ratio) // FRAME_SAMPLES)]
        return Clip(clip.audio[:cut], " ".join(words[:keep]), teacher=teacher, features=features, ratio=clip.ratio,
                    lead=clip.lead)

    @torch.no_grad()
    def precompute(self, clips: list[Clip], draws: int = 1, group: int = 16, log=print) -> None:
        """Set each clip's `draws`: the model's listen features of the clip through `draws` draws
        of the channel (sped as `channel.speed` says, the ratio kept for its phoneme times), each
        with its tail of silence (`with_tail`), each after one of `feature_leads_s` of silence."""
        keep_heap_compact()
        rng = self._np_rng()
        jobs = sorted(((i, d) for i in range(len(clips)) for d in range(draws)), key=lambda j: len(clips[j[0]].audio))
        drawn: dict[int, list[Clip]] = {}
        leads = [state for state, _ in self.leads]  # the encoder's state after each lead
        picks = rng.integers(len(leads), size=len(jobs))
        start = time.monotonic()
        for g in range(0, len(jobs), group):
            idx = [i for i, _ in jobs[g:g + group]]
            sped = [self._speed(clips[i].audio, rng) for i in idx]
            pieces = [with_tail(channel(pcm, self.channel, rng, other=self.train[rng.integers(len(self.train))].audio))
                      for pcm, _ in sped]
            rows = np.zeros((len(idx), max(len(p) for p in pieces)), dtype=np.float32)
            for r, piece in enumerate(pieces):
                rows[r, :len(piece)] = piece
            lead = picks[g:g + group]
            state = load_state_tensors(self.model.listen.init_state(len(idx)), [
                torch.cat(rows_of) for rows_of in zip(*(leads[k] for k in lead))])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                features = self.model.listen.step(torch.from_numpy(rows), state)[0].features.float()
            for r, (i, piece, (_, ratio)) in enumerate(zip(idx, pieces, sped)):
                drawn.setdefault(i, []).append(dataclasses.replace(
                    clips[i], features=features[r, :len(piece) // FRAME_SAMPLES].half().numpy(), ratio=ratio,
                    lead=int(lead[r])))
            if (g // group) % 100 == 0 or g + group >= len(jobs):
                log(f"[hearing] features: {min(g + group, len(jobs))}/{len(jobs)} clip draws, {time.monotonic() - start:.0f} s")
        for i, versions in drawn.items():
            clips[i].draws = versions

    @contextmanager
    def _stopped(self):
        """A tuned front's frames stop before its tuned layers while features are precomputed."""
        if self.front is not None:
            self.front.stop = self.front.split
        try:
            yield
        finally:
            if self.front is not None:
                self.front.stop = None

    def _whisper_span(self) -> tuple[int, int]:
        """Where a tick's Whisper frames sit in its features: (first column, width)."""
        offset = 0
        for source, width, frames in self.model.cfg.listen_feature_parts:
            if source == "whisper":
                return offset, width * frames
            offset += width * frames
        raise ValueError("these features have no Whisper part")

    def tuned_features(self, features: torch.Tensor, segments: list[list[tuple[int, int, int]]]) -> torch.Tensor:
        """Precomputed rows [B, ticks, F] whose Whisper part stops before the tuned layers -> the
        features the head reads: that part through the tuned layers (`WhisperFront.tuned_frames`,
        each draw after its lead), `segments` per row (first tick, ticks, lead) of each draw."""
        front, (b, n, _) = self.front, features.shape
        offset, width = self._whisper_span()
        per = width // front.width  # frames per tick
        x = features[..., offset:offset + width].reshape(b, n * per, front.width)
        contexts = [front.lead_context(frames) for _, frames in self.leads]
        frames = front.tuned_frames(x, [[(t * per, k * per, lead) for t, k, lead in row] for row in segments], contexts)
        return torch.cat([features[..., :offset], frames.reshape(b, n, width), features[..., offset + width:]], dim=-1)

    def _speed(self, pcm: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """The clip sped by one of SPEEDS (a `channel.speed` share of draws), and its length ratio."""
        if rng.random() >= self.hc.channel.speed:
            return pcm, 1.0
        up, down = SPEEDS[rng.integers(len(SPEEDS))]
        return speed(pcm, up, down), up / down

    @torch.no_grad()
    def _after_silence(self, seconds: float) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The listen encoder's state tensors (one row) after `seconds` of silence, whole ticks,
        and a tuned front's frames of that silence before its tuned layers [m, width] (None
        without a tuned front)."""
        state = self.model.listen.init_state(1)
        features = self.model.listen.step(torch.zeros(1, round(seconds / TICK_S) * FRAME_SAMPLES), state)[0].features
        if self.front is None:
            return state_tensors(state), None
        offset, width = self._whisper_span()
        return state_tensors(state), features[0, :, offset:offset + width].reshape(-1, self.front.width)

    def batch(self) -> tuple[torch.Tensor, ...]:
        """Audio [B, T] (a Whisper front's model: the precomputed features [B, ticks, F]) and
        frames [B] (whole ticks), targets (concatenated), their lengths [B],
        the same for the phoneme CTC, phoneme labels [B, head frames] (-100 where unknown), and the teacher's frames [B, head
        frames, width] with a mask [B, head frames] of those known (None without distillation), and
        per row the (first tick, ticks, lead) of each precomputed draw in it (None for audio rows).

        Each row is packed with augmented clips back to back, its text theirs joined by spaces,
        until the next would pass `max_seconds`; then the tail of silence, and padding."""
        rng = self._np_rng()
        limit = int(self.hc.max_seconds * SAMPLE_RATE_HZ)
        rows: list[list[np.ndarray]] = []
        texts: list[list[str]] = []
        placed: list[list[tuple[Clip, float, int]]] = []  # clip, speed ratio, offset (samples)
        for _ in range(self.hc.batch_size):
            pieces, words, used, where = [], [], 0, []
            for _tries in range(6):  # a clip that would not fit (sped down, where not yet sped) is drawn again
                clip = self._draw(rng)
                length = (len(clip.features) * FRAME_SAMPLES if clip.features is not None
                          else len(clip.audio) * max(d / u for u, d in SPEEDS))
                if pieces and used + length > limit:
                    continue
                if clip.features is not None:  # precomputed: a tick's features stand for its samples
                    pieces.append(clip.features)
                    words.append(clip.text)
                    where.append((clip, clip.ratio, used))
                    used += len(clip.features) * FRAME_SAMPLES
                    continue
                pcm, ratio = self._speed(clip.audio, rng)
                other = self.train[rng.integers(len(self.train))].audio
                pieces.append(channel(pcm, self.channel, rng, other=other))
                words.append(clip.text)
                where.append((clip, ratio, used))
                used += len(pieces[-1])
            rows.append(pieces)
            texts.append(words)
            placed.append(where)
        features = self.precomputed  # rows of features (each clip's tail in them), else audio
        per_tick = 1 if features else FRAME_SAMPLES
        ticks = [-(-sum(len(p) for p in r) // per_tick) + (0 if features else TAIL_TICKS) for r in rows]
        audio = np.zeros((len(rows), max(ticks) * per_tick, *rows[0][0].shape[1:]), dtype=np.float32)
        rate = self.head.out_frames / TICK_S
        labels = np.full((len(rows), max(ticks) * self.head.out_frames), -100, dtype=np.int64)
        for i, pieces in enumerate(rows):
            joined = np.concatenate(pieces)
            audio[i, :len(joined)] = joined
            for (clip, ratio, offset), piece in zip(placed[i], pieces):
                if clip.phones:
                    phone_labels(clip.phones, offset / SAMPLE_RATE_HZ, ratio, len(piece) * FRAME_SAMPLES / per_tick / SAMPLE_RATE_HZ,
                                 rate, self.hc.phone_delay_frames, labels[i])
        tokens = [self.tokenizer.encode(" ".join(t)) for t in texts]
        phones = [ctc_phonemes(" ".join(t)) for t in texts]
        segments = [[(offset // FRAME_SAMPLES, len(piece), clip.lead) for (clip, _, offset), piece in zip(where, pieces)]
                    for where, pieces in zip(placed, rows)] if features else None
        return (torch.from_numpy(audio), torch.tensor(ticks), *_concatenated(tokens), *_concatenated(phones),
                torch.from_numpy(labels), self.teacher_frames(placed, labels.shape), segments)

    @property
    def _frame_samples(self) -> int:
        return FRAME_SAMPLES // self.head.out_frames

    def teacher_frames(self, placed: list[list[tuple[Clip, float, int]]],
                       shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The teacher's frames [B, n, width] of each row's clips where they were placed (and sped),
        and the mask [B, n] of frames that have one."""
        if not self.distill_width:
            return None
        fs = self._frame_samples
        frames = np.zeros((*shape, self.distill_width), dtype=np.float16)
        known = np.zeros(shape, dtype=bool)
        for i, row in enumerate(placed):
            for clip, ratio, offset in row:
                if clip.teacher is None:
                    continue
                end = min(shape[1], -(-int(offset + len(clip.audio) * ratio) // fs))
                j = np.arange(offset // fs, end)
                k = np.clip(((j + 0.5) * fs - offset) / ratio // fs, 0, len(clip.teacher) - 1).astype(int)
                frames[i, j], known[i, j] = clip.teacher[k], True
        return torch.from_numpy(frames), torch.from_numpy(known)

    def augment_features(self, features: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """VTLP and SpecAugment on features [B, n, F], a draw per row: every part of the features
        (`cfg.listen_feature_parts`) masked over the same stretches of time; a log-mel part's mel
        axis also warped and masked in bands (a Whisper front's frames have no mel axis)."""
        hc = self.hc
        b, n, _ = features.shape
        # Time masks in 10 ms steps, each part's frames masked where their centres fall.
        steps = round(n * TICK_S / 0.01)
        widths = torch.from_numpy(rng.integers(hc.time_mask_frames + 1, size=(hc.time_masks, b)))
        starts = torch.from_numpy(rng.integers(max(1, steps - hc.time_mask_frames), size=(hc.time_masks, b)))
        out, offset = [], 0
        for source, width, frames in self.model.cfg.listen_feature_parts:
            x = features[..., offset:offset + width * frames].reshape(b, n * frames, width)
            offset += width * frames
            centres = (torch.arange(n * frames) + 0.5) * TICK_S / frames / 0.01  # in 10 ms steps
            masked = ((centres >= starts[..., None]) & (centres < (starts + widths)[..., None])).any(0)[..., None]
            if source == "mel":
                factors = np.where(rng.random(b) < hc.vtlp, rng.uniform(*hc.vtlp_range, b), 1.0)
                x = warp_mel(x, torch.tensor(factors, dtype=torch.float32)[:, None, None])
                for _ in range(hc.freq_masks):
                    bands = torch.from_numpy(rng.integers(hc.freq_mask_bins + 1, size=b))
                    low = torch.from_numpy(rng.integers(max(1, width - hc.freq_mask_bins), size=b))
                    pos = torch.arange(width)[None]
                    masked = masked | ((pos >= low[:, None]) & (pos < (low + bands)[:, None]))[:, None, :]
            out.append(torch.where(masked, x.mean(dim=(1, 2), keepdim=True), x).reshape(b, n, -1))
        return torch.cat(out, dim=-1)

    def step(self, step: int) -> dict[str, float]:
        batch = self._next.result() if self._next is not None else self.batch()
        self._next = self._pool.submit(self.batch)
        audio, ticks, targets, target_lengths, phones, phone_lengths, labels, teacher, segments = batch
        if self.precomputed:
            features = audio
            if self.front is not None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                    features = self.tuned_features(features, segments).float()
        else:
            with torch.no_grad():
                features = self.model.listen(audio).features
        features = self.augment_features(features, self._np_rng())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self.head.hidden(features)
            logits = self.head.slot_logits(hidden)
            phone_logits = self.modules["phones"](hidden) if "phones" in self.modules else None
            predicted = self.modules["distill"](hidden) if teacher is not None else None
            phone_ctc_logits = (self.head.phone_logits(hidden)
                                if self.head.phone_out is not None and self.hc.phone_ctc > 0 else None)
        ctc = self.head.ctc_loss(logits, targets, target_lengths, ticks)
        loss, figures = ctc, {"ctc": ctc.item()}
        if phone_ctc_logits is not None:
            slots = phone_ctc_logits.shape[1] // logits.shape[1]  # per tick
            phone_ctc = F.ctc_loss(phone_ctc_logits.float().log_softmax(-1).transpose(0, 1), phones,
                                   ticks * slots, phone_lengths, blank=self.head.phone_blank, zero_infinity=True)
            loss = loss + self.hc.phone_ctc * phone_ctc
            figures["phone_ctc"] = phone_ctc.item()
        if phone_logits is not None and bool((labels >= 0).any()):
            phone_ce = F.cross_entropy(phone_logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
            loss = loss + self.hc.phone_weight * phone_ce
            known = labels >= 0
            figures["phone_ce"] = phone_ce.item()
            figures["phone_accuracy"] = (phone_logits.argmax(-1) == labels)[known].float().mean().item()
        if predicted is not None:
            cos = self.distill_similarity(predicted, *teacher)
            loss = loss + self.hc.distill * (1 - cos)
            figures["distill_cos"] = cos.item()
        _apply(self.optimizers["listen_text"], loss, step, self.progress, self.oc)
        figures["loss"] = loss.item()
        if self.heldout and (step + 1) % self.hc.eval_every == 0:
            figures.update(self.heldout_wer())
        return figures

    def distill_similarity(self, predicted: torch.Tensor, teacher: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Mean cosine between each head frame's prediction [B, n, W] and the teacher's frame
        [B, n, W] `distill_delay_frames` before it, over the teacher's known frames [B, n]."""
        d, n = self.hc.distill_delay_frames, predicted.shape[1]
        cos = F.cosine_similarity(predicted[:, d:].float(), teacher[:, :n - d].float(), dim=-1)  # [B, n - d]
        return cos[known[:, :n - d]].mean()

    @torch.no_grad()
    def heldout_wer(self) -> dict[str, float]:
        """Per held-out set, the WER of greedy CTC (offline, which equals streaming) as
        `<set>_wer`, and where the head has a phoneme output its greedy phoneme error rate as
        `<set>_per` (against `ctc_phonemes` of the text)."""
        was = self.head.training
        self.head.eval()
        out = {}
        for name, clips in self.heldout.items():
            heard = [transcribe(self.model, c.audio, self.tokenizer) for c in clips]
            out[f"{name}_wer"] = summary([{"ref": c.text, "hyp": text} for c, (text, _) in zip(clips, heard)])["wer"]
            if self.head.phone_out is not None:
                counts = sum((align(ctc_phonemes(c.text), phones) for c, (_, phones) in zip(clips, heard)),
                             ErrorCounts())
                out[f"{name}_per"] = counts.wer
        self.head.train(was)
        return out


def attach_teacher(clips: list[Clip], frame_s: float, whisper=None, group: int = 16,
                   log=print, window_s: float | None = None, hop_s: float = 0.32, chunk: int | None = None) -> int:
    """Set each clip's `teacher`: Whisper's encoder frames of the clip alone (clips of similar
    length padded with silence into one encoder call), averaged over `frame_s`; returns their
    width. Clips over Whisper's 30 s window get none. ~7 ms of the 2 cores per second of audio.
    With `chunk`: the frames of `michi.model.whisper_encoder.WhisperFront` (blocks of `chunk` 20 ms
    frames, `window_s` of the past, default 3 s: what the streaming front computes), ~2x the time.
    With `window_s` alone: the frames of `streaming_encoder_frames` (the encoder over the last
    `window_s` every `hop_s`), clip by clip, ~9x the time."""
    per, fs = round(frame_s / ENCODER_FRAME_S), round(frame_s * SAMPLE_RATE_HZ)
    if chunk:
        front = WhisperFront(WhisperEncoder.from_ct2(), chunk, round((window_s or 3.0) / ENCODER_FRAME_S) // chunk * chunk)

        def encode(rows: np.ndarray, frames: int) -> np.ndarray:
            pcm = torch.from_numpy(np.pad(rows, ((0, 0), (0, -rows.shape[1] % FRAME_SAMPLES_24K))))
            with torch.no_grad():
                return front(pcm)[:, :frames].numpy()
    else:
        whisper = whisper or load_whisper(threads=2)

        def encode(rows: np.ndarray, frames: int) -> np.ndarray:
            return encoder_frames(whisper, rows, SAMPLE_RATE_HZ, frames)
    if window_s and not chunk:
        start, width = time.monotonic(), 0
        for k, clip in enumerate(clips, 1):
            enc = streaming_encoder_frames(whisper, clip.audio, SAMPLE_RATE_HZ, window_s, hop_s)
            n = -(-len(clip.audio) // fs)
            enc = np.pad(enc, ((0, n * per - len(enc)), (0, 0)), mode="edge")
            clip.teacher, width = enc.reshape(n, per, -1).mean(1).astype(np.float16), enc.shape[1]
            if k * 10 // len(clips) > (k - 1) * 10 // len(clips):
                log(f"[hearing] streaming teacher frames: {k}/{len(clips)} clips, {time.monotonic() - start:.0f} s")
        return width
    order = [i for i in sorted(range(len(clips)), key=lambda i: len(clips[i].audio))
             if len(clips[i].audio) <= 30 * SAMPLE_RATE_HZ - fs]
    width, start, shown = 0, time.monotonic(), 0
    for g in range(0, len(order), group):
        idx = order[g:g + group]
        n = -(-len(clips[idx[-1]].audio) // fs)
        rows = np.zeros((len(idx), n * fs), dtype=np.float32)
        for r, i in enumerate(idx):
            rows[r, :len(clips[i].audio)] = clips[i].audio
        enc = encode(rows, n * per)
        enc = enc.reshape(len(idx), n, per, -1).mean(2).astype(np.float16)
        width = enc.shape[-1]
        for r, i in enumerate(idx):
            clips[i].teacher = enc[r, :-(-len(clips[i].audio) // fs)]
        if (g + len(idx)) * 10 // len(order) > shown or g + len(idx) == len(order):
            shown = (g + len(idx)) * 10 // len(order)
            log(f"[hearing] teacher frames: {g + len(idx)}/{len(order)} clips, {time.monotonic() - start:.0f} s")
    return width


@torch.no_grad()
def transcribe(model: MichiModel, pcm: np.ndarray, tokenizer) -> tuple[str, list[int] | None]:
    """Greedy CTC of the head over a whole 24 kHz clip (plus the tail of silence): its text, and
    its phonemes where the head has a phoneme output (else None)."""
    pcm = with_tail(pcm)
    head = model.listen_text
    hidden = head.hidden(model.listen(torch.from_numpy(pcm)[None]).features)
    best = head.slot_logits(hidden).flatten(1, 2).argmax(-1)
    text = tokenizer.decode(emitted(collapse(best, head.initial_last_token(1), head.blank)))
    if head.phone_out is None:
        return text, None
    best = head.phone_logits(hidden).argmax(-1)
    return text, emitted(collapse(best, torch.tensor([head.phone_blank]), head.phone_blank))


def heldout_sets(voice: list[Clip], asterisk: list[Clip], sentences: list[Clip] = ()) -> dict[str, list[Clip]]:
    """The stage's held-out sets: the voice and the Asterisk prompts, clean and through the
    telephone line; and `sentences`, held-out sentences read by the training voices (their WER
    against the held-out voice's tells unheard texts from an unheard voice)."""
    sets = {"heldout_voice": voice, "asterisk": asterisk,
            "asterisk_telephone": [Clip(telephone(c.audio), c.text) for c in asterisk]}
    return {**sets, "heldout_sentence": list(sentences)} if sentences else sets


def _lm_texts(extra: list[str]) -> list[str]:
    """The hearing LMs' texts: the synthetic corpus's training sentences
    (`michi.data.text.sentences("train")`, disjoint from its held-out ones) and `extra` texts (the
    Asterisk "train" transcripts)."""
    from ..data.text import sentences

    return [*sentences("train"), *extra]


def hearing_lm(extra: list[str] = ()) -> CharLM:
    """The character LM the head decodes with (`michi.model.textlm`), on `_lm_texts`, with the
    decoder settings."""
    lm = CharLM.train(_lm_texts(extra))
    lm.decoder = dict(LM_DECODER)
    return lm


def hearing_word_lm(extra: list[str], spell: CharLM) -> WordLM:
    """The word trigram LM the phoneme decoder scores words with (`michi.model.wordlm`): the same
    texts as `hearing_lm`'s and WordNet's definitions (`michi.data.text.wordnet_definitions`,
    never its held-out example sentences), words it never saw spelled by `spell` (that LM)."""
    from ..data.text import wordnet_definitions

    return WordLM.train([*_lm_texts(extra), *wordnet_definitions()], spell)


def hearing_lexicon(lm: CharLM, log=None) -> Lexicon:
    """The lexicon the head's phonemes decode into (`michi.model.lexicon`): the LM's words and a
    dictionary's (`michi.data.text.dictionary_words`: WordNet's, inflected, and number words),
    with the decoder settings."""
    from ..data.text import dictionary_words

    return Lexicon.build(lm.words | dictionary_words(), PHONE_DECODER, log=log)


def plot_curve(logs: str | Path | list[str | Path], png: str | Path,
               title: str = "hearing stage: held-out WER") -> Path:
    """Held-out WER per set (and the training CTC loss) against training minutes, from the stage's
    loss log; several logs
    (runs that continued one another) are chained in time, a dashed line where each begins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, starts, offset = [], [], 0.0
    for log in logs if isinstance(logs, list) else [logs]:
        run = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
        starts.append(offset / 60)
        rows += [{**r, "minutes": (offset + r["wall_s"]) / 60} for r in run]
        offset += run[-1]["wall_s"] if run else 0.0
    keys = sorted({k for r in rows for k in r if k.endswith(("_wer", "_per"))})
    fig, ax = plt.subplots(figsize=(7, 4))
    colors: dict[str, str] = {}
    for key in keys:  # a set's phoneme error rate dashed, in its WER's colour
        points = [(r["minutes"], 100 * r[key]) for r in rows if key in r and math.isfinite(r[key])]
        name, per = key[:-4], key.endswith("_per")
        if points:
            line, = ax.plot(*zip(*points), marker="o", ms=3, ls="--" if per else "-", color=colors.get(name),
                            label=f"{name} PER" if per else name)
            colors[name] = line.get_color()
    for start in starts[1:]:
        ax.axvline(start, color="grey", ls="--", lw=0.8)
    ctc = [(r["minutes"], r.get("ctc", r.get("loss"))) for r in rows if r.get("ctc", r.get("loss")) is not None]
    if ctc:  # the training CTC loss per character, which moves long before the WER does
        loss_ax = ax.twinx()
        loss_ax.plot(*zip(*ctc), color="grey", lw=0.8, alpha=0.7)
        loss_ax.set_ylabel("training CTC loss per character (grey)")
        loss_ax.set_ylim(0, 4)  # the first steps (blank-only output) sit far above
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel("WER % (PER %: greedy phonemes, dashed)" if any(k.endswith("_per") for k in keys) else "WER %")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)

