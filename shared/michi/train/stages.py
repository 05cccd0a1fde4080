"""The training stages of the recipe (see recipe.py for their order):

- text: the backbone as a plain LM on pure text (at tiny size this stands in for the pretrained
  SmolLM2 a full-size run starts from);
- codec: listen encoder + vocoder as an autoencoder with HiFi-GAN losses (mel L1 x45, multi-period
  and multi-scale discriminators, feature matching), plus the listen text head's CTC loss on the
  transcripts; noise on the latents keeps the decoder tolerant of the speak head's small errors;
- vocoder: the same losses for the vocoder alone, on the latents of the frozen listen encoder
  (decoder refinement; also how a model gets a new vocoder without changing its latent space);
- speak: the speak head (and the latent input projections) on frozen codec latents, conditioned
  on the hidden states of the frozen backbone;
- joint: backbone + text head + speak head on tick sequences, with pure-text batches mixed in at
  `text_ratio` so the LM keeps what it knew; `baseline` is the same budget on text only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.discriminators import (
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    codec_generator_loss,
    discriminator_loss,
)
from ..model.michi import MichiModel
from .batches import AudioBank, SequenceBank, TextBank
from .loop import Dist, wrap


@dataclass
class OptimConfig:
    lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0

    def lr_at(self, step: int, progress: float) -> float:
        """Linear warm-up over steps, then cosine decay to 10% over the stage's progress (the
        fraction of its steps or of its time budget spent, whichever is larger)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _adamw(params, oc: OptimConfig, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=oc.lr, betas=betas,
                             weight_decay=oc.weight_decay)


def _apply(optimizer: torch.optim.Optimizer, loss: Tensor, step: int, progress: float, oc: OptimConfig) -> None:
    for group in optimizer.param_groups:  # a group's "lr_scale" (default 1) scales the schedule's rate
        group["lr"] = oc.lr_at(step, progress) * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, oc.grad_clip)
    optimizer.step()


# ---- codec --------------------------------------------------------------------------------------
class Discriminators(nn.ModuleList):
    """The discriminators as one module (one DDP wrapper): audio -> [(logits, features), ...]."""

    def forward(self, audio: Tensor) -> list:
        return [disc(audio) for disc in self]


@dataclass
class CodecConfig:
    batch_size: int = 16
    crop_ticks: int = 12  # 0.96 s crops for the autoencoder and discriminators
    ctc_batch_size: int = 8
    ctc_max_seconds: float = 8.0
    ctc_weight: float = 1.0
    latent_noise: float = 0.1  # std of the noise added to latents before the vocoder
    latent_l2: float = 0.01
    adversarial_after: float = 0.3  # mel-only warm-up (fraction of the stage) before the discriminators join
    disc_width: float = 1.0  # discriminator channel scale (HiFi-GAN's widths at 1.0)


class CodecGenerator(nn.Module):
    """Encoder -> (noisy) latents -> vocoder, and the CTC head: everything the generator trains.
    Without utterances (the vocoder stage) the encoder only encodes and there is no CTC loss."""

    def __init__(self, model: MichiModel, cc: CodecConfig, tokenizer):
        super().__init__()
        self.listen, self.listen_text, self.vocoder = model.listen, model.listen_text, model.vocoder
        self.cc, self.tokenizer, self.frame = cc, tokenizer, model.cfg.frame_samples

    def forward(self, crops: Tensor, utt_audio: Tensor | None = None, utt_lengths: Tensor | None = None,
                texts: list[str] | None = None):
        with torch.set_grad_enabled(torch.is_grad_enabled() and utt_audio is not None):
            latents = self.listen(crops).latents
        noisy = latents + self.cc.latent_noise * torch.randn_like(latents)
        fake = self.vocoder(noisy)[:, : crops.shape[1]]
        if utt_audio is None:
            return fake, latents.pow(2).mean(), latents.new_zeros(())
        utt_audio = F.pad(utt_audio, (0, -utt_audio.shape[1] % self.frame))  # whole frames only
        features = self.listen(utt_audio).features
        logits = self.listen_text(features)
        ids = [self.tokenizer.encode(t) for t in texts]
        targets = torch.tensor([i for row in ids for i in row], dtype=torch.long, device=crops.device)
        target_lengths = torch.tensor([len(row) for row in ids], dtype=torch.long)
        frames = (utt_lengths + self.frame - 1) // self.frame
        ctc = self.listen_text.ctc_loss(logits, targets, target_lengths, frames.to(logits.device))
        return fake, latents.pow(2).mean(), ctc


class CodecStage:
    """`name` "codec" trains encoder, text head and vocoder; "vocoder" the vocoder alone."""

    def __init__(self, model: MichiModel, bank: AudioBank, tokenizer, d: Dist, cc: CodecConfig,
                 oc: OptimConfig, seed: int = 0, name: str = "codec"):
        if name not in ("codec", "vocoder"):
            raise ValueError(f"a codec stage is 'codec' or 'vocoder', not {name!r}")
        self.name = name
        self.model, self.bank, self.d, self.cc, self.oc = model, bank, d, cc, oc
        for p in model.parameters():
            p.requires_grad_(False)
        trained = (model.vocoder,) if name == "vocoder" else (model.listen, model.listen_text, model.vocoder)
        for part in trained:
            for p in part.parameters():
                p.requires_grad_(True)
        ch = tuple(max(4, int(c * cc.disc_width)) for c in (32, 128, 512, 1024, 1024))
        self.discs = Discriminators([MultiPeriodDiscriminator(channels=ch),
                                    MultiScaleDiscriminator(width=max(4, int(128 * cc.disc_width)))]).to(d.device)
        self.gen = wrap(CodecGenerator(model, cc, tokenizer).to(d.device), d)
        self.disc = wrap(self.discs, d)
        self.modules = {"generator": self.gen, "discriminators": self.disc}
        self.optimizers = {"generator": _adamw(self.gen.parameters(), oc, betas=(0.8, 0.99)),
                           "discriminators": _adamw(self.discs.parameters(), oc, betas=(0.8, 0.99))}
        self.rng = torch.Generator().manual_seed(seed * 1000 + d.rank)
        self.progress = 0.0  # set by the loop before each step

    def step(self, step: int) -> dict[str, float]:
        cc, dev = self.cc, self.d.device
        crops = self.bank.crops(cc.batch_size, cc.crop_ticks * self.model.cfg.frame_samples, self.rng).to(dev)
        if self.name == "vocoder":
            fake, latent_l2, ctc = self.gen(crops)
        else:
            utt, lengths, texts = self.bank.utterances(
                cc.ctc_batch_size, int(cc.ctc_max_seconds * self.model.cfg.sample_rate_hz), self.rng)
            fake, latent_l2, ctc = self.gen(crops, utt.to(dev), lengths, texts)
        adversarial = self.progress >= cc.adversarial_after
        discs = list(self.discs) if adversarial else []
        g = codec_generator_loss(crops, fake, discs)
        total = g["total"] + cc.ctc_weight * ctc + cc.latent_l2 * latent_l2
        _apply(self.optimizers["generator"], total, step, self.progress, self.oc)
        out = {"mel": g["mel"].item()}
        if self.name == "codec":
            out.update(ctc=ctc.item(), latent_l2=latent_l2.item())
        if adversarial:
            d_loss = torch.zeros((), device=dev)
            real_out, fake_out = self.disc(crops), self.disc(fake.detach())
            for (real_logits, _), (fake_logits, _) in zip(real_out, fake_out):
                d_loss = d_loss + discriminator_loss(real_logits, fake_logits)
            _apply(self.optimizers["discriminators"], d_loss, step, self.progress, self.oc)
            out.update(adversarial=g["adversarial"].item(), features=g["features"].item(), disc=d_loss.item())
        return out


# ---- sequences: speak, joint, text ---------------------------------------------------------------
class SequenceLosses(nn.Module):
    """The backbone read tick by tick (teacher forced, in parallel) or as a plain LM on text."""

    def __init__(self, model: MichiModel, flow_repeats: int = 4, latent_noise: float = 0.0):
        super().__init__()
        self.model = model
        self.flow_repeats = flow_repeats
        self.latent_noise = latent_noise
        self._silence: dict[int, Tensor] = {}

    def silence_latents(self, n: int, device) -> Tensor:
        """What the listen encoder hears in a call where the user is silent: [n, D] normalised."""
        if n not in self._silence:
            m = self.model
            with torch.no_grad():
                raw = m.listen(torch.zeros(1, n * m.cfg.frame_samples, device=device)).latents[0]
            self._silence = {n: m.latent_norm.normalize(raw).detach()}
        return self._silence[n]

    def forward(self, kind: str, **batch) -> dict[str, Tensor]:
        return self.speech(**batch) if kind == "speech" else self.text(**batch)

    def speech(self, tokens, latents, prev_tokens, prev_latents, prev_valid, mask, phones, next_phone,
               phone_take) -> dict[str, Tensor]:
        m = self.model
        bb, norm = m.backbone, m.latent_norm
        b, n = tokens.shape
        prev = norm.normalize(prev_latents) * prev_valid[..., None]  # a call starts from zeros
        if self.latent_noise and self.training:  # the fed-back latent is the model's own, imperfect
            prev = prev + self.latent_noise * torch.randn_like(prev) * prev_valid[..., None]
        user = self.silence_latents(n, tokens.device)[None].expand(b, n, -1)
        no_user_text = torch.full((b * n, 1), -1, dtype=torch.long, device=tokens.device)
        fused = bb.embed_tick(prev_tokens.reshape(-1), prev.reshape(b * n, -1), user.reshape(b * n, -1),
                              no_user_text, phones.reshape(b * n, -1), next_phone.reshape(-1)).view(b, n, -1)
        hidden = bb(fused)
        out = {"text": F.cross_entropy(bb.text_logits(hidden[mask]), tokens[mask])}
        if bb.phone_frames:
            out["phones"] = F.binary_cross_entropy_with_logits(bb.phone_logits(hidden[mask]).float(), phone_take[mask])
        elif bb.phone_slots:
            out["phones"] = F.cross_entropy(bb.phone_logits(hidden[mask]), phone_take[mask].clamp(max=bb.phone_slots))
        x = norm.normalize(latents[mask])
        cond = hidden[mask]
        r = self.flow_repeats
        out["flow"] = m.speak_head.loss(x.repeat(r, 1), cond.repeat(r, 1))
        return out

    def text(self, ids, mask) -> dict[str, Tensor]:
        bb = self.model.backbone
        hidden = bb(bb.embed_text(ids))[:, :-1]
        keep = mask[:, 1:]
        return {"lm": F.cross_entropy(bb.text_logits(hidden[keep]), ids[:, 1:][keep])}


@dataclass
class SequenceConfig:
    batch_size: int = 16
    max_ticks: int = 128
    text_batch_size: int = 16
    max_text_tokens: int = 256
    text_ratio: float = 0.3  # fraction of joint steps that are pure text
    text_weight: float = 1.0  # weight of the agent text loss on speech batches
    flow_repeats: int = 4  # noise draws per target latent in the flow loss
    # std of the noise on the fed-back (normalised) agent latent, so that the model reads the text
    # and phonemes rather than copy its previous frame (DESIGN.md, "The latent")
    latent_noise: float = 0.2
    phone_weight: float = 1.0  # weight of the advance head's loss (models with a phoneme stream)
    pack: int = 1  # fill every row with utterances back to back (no padding); 0: one utterance a row
    # bf16 autocast of the forward passes: 1 where the device computes bf16 natively (a GPU with
    # bf16, or a CPU whose flags show amx_bf16 or avx512_bf16), 0 to force fp32.
    bf16: int = -1  # -1: decide from the device


def keep_heap_compact() -> None:
    """Have glibc's malloc give large freed blocks back (mmap above 128 kB, trim above 128 kB):
    with its default dynamic threshold, many tensors of varying size fragment the heap (computing
    the hearing stage's features once per clip grew 2.4 GB for 0.4 GB kept). No-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here (else autocast costs more than it saves)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


class SequenceStage:
    """`mode`: "text" (LM only), "speak" (speak head on the frozen backbone), "joint"."""

    def __init__(self, name: str, mode: str, model: MichiModel, d: Dist, sc: SequenceConfig,
                 oc: OptimConfig, speech: SequenceBank | None = None, text: TextBank | None = None,
                 seed: int = 0):
        if mode not in ("text", "speak", "joint"):
            raise ValueError(f"unknown sequence stage mode {mode!r}")
        if mode != "text" and speech is None:
            raise ValueError(f"the {name} stage needs speech shards")
        if mode != "speak" and text is None and not (mode == "joint" and sc.text_ratio == 0):
            raise ValueError(f"the {name} stage needs a text corpus")
        self.name, self.mode, self.model, self.d, self.sc, self.oc = name, mode, model, d, sc, oc
        self.speech, self.text = speech, text
        bb = model.backbone
        for p in model.parameters():
            p.requires_grad_(False)
        if mode == "text":
            trained = [bb]
        elif mode == "speak":
            trained = [model.speak_head, bb.user_latent_in, bb.stream_embed]
            if bb.agent_latent_in is not None:
                trained.append(bb.agent_latent_in)
            if bb.phone_width:
                trained += [bb.phone_embed, bb.next_phone_embed, bb.phone_head]
            if bb.phone_slots:
                bb.phone_slot.requires_grad_(True)
        else:
            trained = [bb, model.speak_head]
        for part in trained:
            for p in part.parameters():
                p.requires_grad_(True)
        self.losses = wrap(SequenceLosses(model, sc.flow_repeats, sc.latent_noise).to(d.device), d)
        self.modules = {"model": self.losses}
        self.optimizers = {"model": _adamw(model.parameters(), oc)}
        self.rng = torch.Generator().manual_seed(seed * 1000 + d.rank)
        self.progress = 0.0  # set by the loop before each step
        self.vocab = bb.vocab

    def _is_text_step(self, step: int) -> bool:
        if self.mode == "text":
            return True
        if self.mode == "speak" or self.sc.text_ratio <= 0:
            return False
        # Deterministic interleaving: text steps spread evenly at the configured ratio.
        return math.floor((step + 1) * self.sc.text_ratio) > math.floor(step * self.sc.text_ratio)

    def step(self, step: int) -> dict[str, float]:
        dev, sc = self.d.device, self.sc
        self.model.train()
        bf16 = bf16_native(dev) if sc.bf16 < 0 else bool(sc.bf16)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
        if self._is_text_step(step):
            ids, mask = self.text.batch(sc.text_batch_size, sc.max_text_tokens, self.rng, self.vocab.pad)
            with autocast:
                losses = self.losses("text", ids=ids.to(dev), mask=mask.to(dev))
            total = losses["lm"]
        else:
            b = self.speech.batch(sc.batch_size, sc.max_ticks, self.rng, pack=bool(sc.pack),
                                  phone_frames=self.model.cfg.phone_frames)
            with autocast:
                losses = self.losses("speech", **{k: v.to(dev) for k, v in vars(b).items()})
            total = (losses["flow"] + (0.0 if self.mode == "speak" else sc.text_weight * losses["text"])
                     + sc.phone_weight * losses.get("phones", 0.0))
        _apply(self.optimizers["model"], total, step, self.progress, self.oc)
        return {k: v.item() for k, v in losses.items()}
