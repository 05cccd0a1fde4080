"""mel-PCA: an analytic codec whose latents are intelligible by construction (DESIGN.md, "The latent").

Encoder (the listen side): 24 kHz audio -> causal log-mel frames at 100 Hz (hop 240, Hann window
960, n_fft 1024, 80 Slaney mel bins up to 12 kHz, natural log of the mel magnitudes floored at
1e-5) -> 8 frames stacked per 80 ms tick (640 values, frame-major) -> minus the corpus mean ->
projected on the top K principal directions of the corpus: the raw latent [K]. Frame f's window
covers samples [240 f - 720, 240 f + 240): it ends with the frame's last sample, the stream is
left-padded with 720 zeros, and nothing looks ahead. Tick t (frames 8t .. 8t+7) is complete once
sample 1920 (t + 1) - 1 has arrived.

Decoder (the analytic floor, no training): latent -> inverse projection + mean -> 8 log-mel frames
-> mel magnitudes -> linear magnitudes by the mel filterbank's pseudo-inverse (clamped >= 0) -> a
uniformly random phase per frame and bin (`random_phases`: an integer hash of the frame's index in
its stream and the bin; the index travels in the decoder state) -> inverse rFFT -> synthesis Hann
window -> overlap-add at hop 240. Frame f's samples land on the same span as its analysis window,
so the output is the input's timeline delayed by `DECODER_DELAY` = 720 samples (30 ms, window -
hop): every latent gives its 1920 samples at once, of which the last 720 still wait for the next
latent's first frames. Output sample m depends only on latents t <= m // 1920. Both sides export
to ONNX (`michi.serving.triton.export`; the rFFTs become DFT ops, the phases integer arithmetic).

OLA gain. For coherent frames (true phases) the window-sum normalisation 1 / sum_m w_a w_s (= 1 /
1.5 for a periodic Hann at a quarter-window hop) gives the signal back. Random-phase frames are
incoherent: their powers add, not their amplitudes, and each frame's energy (equal to the windowed
original's, by Parseval) is spread over all n_fft samples instead of being concentrated under the
analysis window. The gain that keeps the expected power is sqrt(n_fft * hop) / sum(w^2) = 1.377,
2.07x (6.3 dB) above the window-sum normalisation; with it the re-analysed log-mel of the
resynthesis has the original's level (tests/model/test_melpca.py checks it).

Every stateful piece follows the streaming protocol (`michi.model.streaming`):
`init_state(batch, device, dtype)`, `step(x, state, exec_mask) -> (y, state)`, `forward(x)` equal to one step from a fresh state, `state.reset(mask)`
for rows that restart at a tick boundary, and states whose tensors flatten with
`michi.model.state.state_tensors`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..audio.mel import mel_filterbank
from .conv import ConvState
from .listen import ListenOutput
from .streaming import StreamingModule, StreamingState

SAMPLE_RATE = 24_000
HOP = 240  # 10 ms: 100 frames per second
WINDOW = 960  # 40 ms Hann
N_FFT = 1024
N_MELS = 80
F_MAX = 12_000.0
LOG_FLOOR = 1e-5
FRAMES_PER_TICK = 8
TICK = HOP * FRAMES_PER_TICK  # 1920 samples = 80 ms
TICK_DIM = FRAMES_PER_TICK * N_MELS  # 640 values per tick
PAD = WINDOW - HOP  # 720: the encoder's causal left pad
DECODER_DELAY = WINDOW - HOP  # 720 samples: decoded sample m is input sample m - 720
BINS = N_FFT // 2 + 1
DEFAULT_K = 64


@functools.lru_cache(maxsize=4)
def _window(device: torch.device | None = None) -> Tensor:
    with torch.inference_mode(False):
        return torch.hann_window(WINDOW, periodic=True, device=device)


@functools.lru_cache(maxsize=4)
def _bank(device: torch.device | None = None) -> Tensor:
    return mel_filterbank(SAMPLE_RATE, N_FFT, N_MELS, 0.0, F_MAX, device)  # [80, 513]


def _ola_gain() -> float:
    """sqrt(n_fft * hop) / sum(w^2): keeps the power of overlapped random-phase frames (module doc)."""
    w = torch.hann_window(WINDOW, periodic=True, dtype=torch.float64, device="cpu")  # not meta
    return float(math.sqrt(N_FFT * HOP) / w.square().sum())


# ---- analysis ---------------------------------------------------------------------------------
def _frames_to_log_mel(frames: Tensor) -> Tensor:
    """Windowed-to-be frames [..., 960] -> log mel [..., 80]."""
    spec = torch.fft.rfft(frames * _window(frames.device), n=N_FFT)
    return torch.log(torch.matmul(spec.abs(), _bank(frames.device).T).clamp(min=LOG_FLOOR))


def causal_log_mel(audio: Tensor) -> Tensor:
    """audio [B, T] or [T] at 24 kHz -> log mel [B, T // 240, 80] (or [T // 240, 80]), causal:
    frame f reads samples 240 f - 720 .. 240 f + 239 (zeros before the start)."""
    squeeze = audio.dim() == 1
    x = (audio[None] if squeeze else audio).float()
    x = F.pad(x, (PAD, 0))
    if x.shape[-1] < WINDOW:
        out = x.new_zeros(x.shape[0], 0, N_MELS)
    else:
        out = _frames_to_log_mel(x.unfold(-1, WINDOW, HOP))
    return out[0] if squeeze else out


def tick_vectors(audio: Tensor | np.ndarray, pad_end: bool = False) -> Tensor:
    """The 640-value stacked log-mel of each whole tick: [B, T // 1920, 640] ([n, 640] for 1-D
    audio). `pad_end` pads the audio with zeros to a whole number of ticks first."""
    x = torch.as_tensor(np.ascontiguousarray(audio) if isinstance(audio, np.ndarray) else audio)
    if pad_end:
        x = F.pad(x, (0, -x.shape[-1] % TICK))
    squeeze = x.dim() == 1
    x = x[None] if squeeze else x
    n = x.shape[-1] // TICK
    mel = causal_log_mel(x[..., :n * TICK])
    out = mel.reshape(mel.shape[0], n, TICK_DIM)
    return out[0] if squeeze else out


# ---- the basis --------------------------------------------------------------------------------
@dataclass
class MelPCABasis:
    """A fitted projection: mean [640], components [K, 640] (orthonormal rows, by decreasing
    variance), std [K] (the corpus std of each latent dimension, for whitening)."""

    mean: Tensor
    components: Tensor
    std: Tensor
    total_variance: float = float("nan")  # trace of the corpus covariance of tick vectors
    ticks: int = 0  # tick vectors the fit saw
    eigenvalues: Tensor | None = field(default=None, repr=False)  # all 640, descending

    @property
    def k(self) -> int:
        return self.components.shape[0]

    @property
    def variance_kept(self) -> float:
        """Fraction of the fitting corpus's variance the K directions keep."""
        return float(self.std.double().square().sum() / self.total_variance)

    def truncate(self, k: int) -> "MelPCABasis":
        """The first k directions (PCA bases are nested)."""
        if not 0 < k <= self.k:
            raise ValueError(f"k must be in 1..{self.k}, got {k}")
        return MelPCABasis(self.mean, self.components[:k], self.std[:k], self.total_variance,
                           self.ticks, self.eigenvalues)

    def project(self, ticks: Tensor) -> Tensor:
        """Tick vectors [..., 640] -> raw latents [..., K]."""
        return (ticks - self.mean) @ self.components.T

    def reconstruct(self, latents: Tensor) -> Tensor:
        """Raw latents [..., K] -> tick vectors [..., 640]."""
        return latents @ self.components + self.mean

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "components": self.components, "std": self.std}
        if self.eigenvalues is not None:
            tensors["eigenvalues"] = self.eigenvalues
        save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(path),
                  metadata={"total_variance": repr(self.total_variance), "ticks": str(self.ticks)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "MelPCABasis":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(t["mean"], t["components"], t["std"], float(meta.get("total_variance", "nan")),
                   int(meta.get("ticks", "0")), t.get("eigenvalues"))


def fit_basis(audio_iterable: Iterable[Tensor | np.ndarray], k: int = DEFAULT_K) -> MelPCABasis:
    """PCA of the tick vectors of every clip (mono 24 kHz, each padded to whole ticks): the
    eigendecomposition of their covariance, in float64. Deterministic: each direction's sign makes
    its largest-magnitude entry positive."""
    if not 0 < k <= TICK_DIM:
        raise ValueError(f"k must be in 1..{TICK_DIM}, got {k}")
    count, total = 0, torch.zeros(TICK_DIM, dtype=torch.float64)
    outer = torch.zeros(TICK_DIM, TICK_DIM, dtype=torch.float64)
    for audio in audio_iterable:
        x = torch.as_tensor(np.ascontiguousarray(audio) if isinstance(audio, np.ndarray) else audio)
        if x.dim() != 1:
            raise ValueError(f"fit_basis takes mono clips [T], got shape {tuple(x.shape)}")
        ticks = tick_vectors(x.float(), pad_end=True).double()
        count += ticks.shape[0]
        total += ticks.sum(0)
        outer += ticks.T @ ticks
    if count < 2:
        raise ValueError(f"fit_basis needs at least 2 ticks of audio, got {count}")
    mean = total / count
    cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
    eigenvalues, vectors = torch.linalg.eigh(cov)  # ascending
    eigenvalues, vectors = eigenvalues.flip(0).clamp(min=0.0), vectors.flip(1)
    components = vectors[:, :k].T.clone()
    peak = components.abs().argmax(dim=1)
    components *= torch.sign(components[torch.arange(k), peak])[:, None]
    return MelPCABasis(mean.float(), components.float(), eigenvalues[:k].sqrt().float(),
                       float(cov.diagonal().sum()), count, eigenvalues.float())


# ---- streaming encoder ------------------------------------------------------------------------
@dataclass
class FrontedState(StreamingState):
    """A `MelPCAEncoder` with a text front: its own audio buffer and the front's state."""

    conv: ConvState
    front: StreamingState


class MelPCAEncoder(StreamingModule, nn.Module):
    """Audio [B, T] at 24 kHz -> ListenOutput(latents [B, T // 1920, K] raw (not whitened),
    features [B, T // 1920, 640] the stacked log-mel beneath them). Streaming: `step` takes a chunk
    of any length and returns the ticks it completed; chunked output equals `forward`.

    `text_front` (e.g. `michi.model.whisper_encoder.WhisperFront`, which steps whole ticks): the
    features are its frames of the same ticks, stacked per tick, instead of the log-mel; with
    `keep_mel`, after the log-mel."""

    def __init__(self, k: int = DEFAULT_K, text_front: nn.Module | None = None, keep_mel: bool = False):
        super().__init__()
        self.k = k
        self.register_buffer("mean", torch.zeros(TICK_DIM))
        self.register_buffer("components", torch.eye(k, TICK_DIM))
        self.text_front = text_front
        self.keep_mel = keep_mel or text_front is None
        self.feature_dim = ((TICK_DIM if self.keep_mel else 0)
                            + (0 if text_front is None else text_front.width * TICK // text_front.frame_samples))
        self.frame_samples = TICK

    def _encode(self, x: Tensor, front: StreamingState | None = None) -> ListenOutput:
        """Left-padded samples [B, PAD + 1920 n] -> the n ticks they hold (`front`: the text
        front's state, which these ticks advance)."""
        n = (x.shape[-1] - PAD) // TICK
        if n <= 0:
            return ListenOutput(x.new_zeros(x.shape[0], 0, self.k), x.new_zeros(x.shape[0], 0, self.feature_dim))
        mel = _frames_to_log_mel(x.float().unfold(-1, WINDOW, HOP))  # [B, 8n, 80]
        features = mel.reshape(x.shape[0], n, TICK_DIM)
        latents = (features - self.mean) @ self.components.T
        if self.text_front is not None:
            ticks = x[..., PAD:PAD + n * TICK].float()
            frames = self.text_front(ticks) if front is None else self.text_front.step(ticks, front)[0]
            frames = frames.reshape(x.shape[0], n, -1)
            features = torch.cat([features, frames], dim=-1) if self.keep_mel else frames
        return ListenOutput(latents.to(x.dtype), features.to(x.dtype))

    def forward(self, audio: Tensor) -> ListenOutput:
        n = audio.shape[-1] // TICK
        return self._encode(F.pad(audio[..., :n * TICK], (PAD, 0)))

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> ConvState | FrontedState:
        # Samples not yet consumed, [B, 1, L]; a fresh stream holds the 720 zeros of the left pad.
        conv = ConvState(torch.zeros(batch_size, 1, PAD, device=device, dtype=dtype), PAD)
        if self.text_front is None:
            return conv
        return FrontedState(conv, self.text_front.init_state(batch_size, device, dtype))

    def _step(self, audio: Tensor, state: ConvState | FrontedState) -> tuple[ListenOutput, ConvState | FrontedState]:
        """A chunk [B, t] (any t >= 0) -> the ticks it completed (maybe none)."""
        conv, front = (state.conv, state.front) if isinstance(state, FrontedState) else (state, None)
        buffer = torch.cat([conv.buffer[:, 0], audio.to(conv.buffer.dtype)], dim=-1)
        n = (buffer.shape[-1] - PAD) // TICK
        conv.buffer = buffer[:, None, n * TICK:]
        return self._encode(buffer[..., :PAD + n * TICK], front), state


# ---- streaming analytic decoder ---------------------------------------------------------------
PHASE_MODULUS = 2**31 - 1  # the Park-Miller prime
PHASE_MULTIPLIER = 48271  # its MINSTD multiplier
PHASE_ROUNDS = 3
# Frame indices wrap here (5.8 hours at 100 frames/s): every (frame, bin) of a period starts the
# hash from its own value (PHASE_PERIOD * BINS < PHASE_MODULUS), and a float32 counter stays exact.
PHASE_PERIOD = 2**21


def random_phases(frames: Tensor, seed: int = 0) -> Tensor:
    """Frame indices (int64, any shape [...]) -> phases [..., 513], uniform on the circle
    and independent-looking across frames and bins: an exact integer hash of (seed, frame, bin).

    Integer arithmetic makes it exportable and bit-identical wherever it runs (torch on any device,
    ONNX Runtime). Each round is a Lehmer step x <- 48271 x mod (2^31 - 1) and a squaring
    x <- x^2 + c mod (2^31 - 1): products stay below 2^62, so int64 never overflows. The squaring is
    what makes the hash non-linear; Lehmer steps alone would give phases linear in the bin, that is
    one time shift per frame, not a random phase."""
    bins = torch.arange(BINS, device=frames.device)
    x = ((frames % PHASE_PERIOD)[..., None] * BINS + bins) % (PHASE_MODULUS - 1) + 1
    for r in range(PHASE_ROUNDS):
        x = x * PHASE_MULTIPLIER % PHASE_MODULUS
        x = (x * x + (seed * PHASE_ROUNDS + r + 1) % PHASE_MODULUS) % PHASE_MODULUS
    return x.float() * (2 * math.pi / PHASE_MODULUS)


@dataclass
class MelPCADecoderState(StreamingState):
    """What the next latent needs: the overlap-add tail and each row's frame counter."""

    tail: Tensor  # [B, 720]: partial sums of the samples after the last emitted one
    # [B, 1]: the index (mod PHASE_PERIOD) of the row's next frame, which picks its random phases.
    # float32 (exact below 2^24), not int64: the graph executions carry it like every other stream
    # state, in the types the Triton configs and client take (FP32, FP16, BOOL).
    frame: Tensor
    # `reset` (the protocol's default) zeroes both in the masked rows: any tick boundary is a valid
    # restart.


class MelPCADecoder(StreamingModule, nn.Module):
    """Raw latents [B, n, K] -> audio [B, n * 1920] at 24 kHz, delayed by DECODER_DELAY (720)
    samples. No trainable parameters: the basis is a frozen buffer. Streaming: `step` takes any
    number of latents; chunked output equals `forward` (frame f of a stream gets the phases
    `random_phases(f, seed)`, whatever the chunking)."""

    def __init__(self, k: int = DEFAULT_K, seed: int = 0):
        super().__init__()
        self.k, self.seed = k, seed
        self.register_buffer("mean", torch.zeros(TICK_DIM))
        self.register_buffer("components", torch.eye(k, TICK_DIM))
        # Fixed, not saved: the filterbank's pseudo-inverse and the synthesis window with its gain.
        if torch.empty(0).device.type == "meta":
            # Built under `with torch.device("meta")` (parameter counts, FLOP counts): shapes only,
            # and nothing computed there may reach the cached banks and windows.
            inv_bank, window = torch.empty(BINS, N_MELS), torch.empty(WINDOW)
        else:
            cpu = torch.device("cpu")
            inv_bank = torch.linalg.pinv(_bank(cpu).double()).float()  # [513, 80]
            window = _window(cpu)
        self.register_buffer("inv_bank", inv_bank, persistent=False)
        self.register_buffer("window", window, persistent=False)  # the synthesis window
        self.noise_gain = _ola_gain()  # of a random-phase frame (module doc, "OLA gain")
        self.frame_samples = TICK
        self.delay = DECODER_DELAY

    def log_mel(self, latents: Tensor) -> Tensor:
        """Raw latents [B, n, K] -> the log-mel frames they reconstruct [B, 8 n, 80]."""
        ticks = latents.float() @ self.components + self.mean
        return ticks.reshape(latents.shape[0], -1, N_MELS)

    def magnitudes(self, latents: Tensor) -> Tensor:
        """Raw latents [B, n, K] -> linear magnitudes [B, 8 n, 513] (pseudo-inverse, clamped >= 0)."""
        return self.mel_magnitudes(self.log_mel(latents))

    def mel_magnitudes(self, log_mel: Tensor) -> Tensor:
        """Log-mel frames [..., 80] -> linear magnitudes [..., 513]."""
        return (torch.exp(log_mel) @ self.inv_bank.T).clamp(min=0.0)

    def noise_phases(self, state: "MelPCADecoderState", frames: int) -> Tensor:
        """The random phases [B, frames, 513] of each row's next `frames` frames; advances the rows'
        frame counters."""
        first = state.frame.long()  # [B, 1]
        phase = random_phases(first + torch.arange(frames, device=first.device), self.seed)
        state.frame = ((first + frames) % PHASE_PERIOD).float()
        return phase

    def spectra(self, latents: Tensor, state: "MelPCADecoderState") -> Tensor:
        """Latents [B, n, K] -> the complex spectra [B, 8 n, 513] of their frames, gain included."""
        magnitude = self.magnitudes(latents)
        return torch.polar(magnitude * self.noise_gain, self.noise_phases(state, magnitude.shape[1]))

    def forward(self, latents: Tensor) -> Tensor:
        return self._step(latents, self.init_state(latents.shape[0], latents.device, latents.dtype))[0]

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> MelPCADecoderState:
        return MelPCADecoderState(torch.zeros(batch_size, PAD, device=device, dtype=torch.float32),
                                  torch.zeros(batch_size, 1, device=device, dtype=torch.float32))

    def _step(self, latents: Tensor, state: MelPCADecoderState) -> tuple[Tensor, MelPCADecoderState]:
        """Latents [B, n, K] (n >= 0) -> their n * 1920 samples [B, n * 1920]."""
        b, n = latents.shape[0], latents.shape[1]
        if n == 0:
            return latents.new_zeros(b, 0), state
        frames = torch.fft.irfft(self.spectra(latents, state), n=N_FFT)[..., :WINDOW]
        frames = frames * self.window  # [B, 8n, 960]
        # Overlap-add at hop 240: frame j covers output [240 j, 240 j + 960) of this step.
        length = HOP * (8 * n - 1) + WINDOW  # = 1920 n + 720
        out = F.fold(frames.transpose(1, 2), (1, length), (1, WINDOW), stride=(1, HOP))[:, 0, 0]
        out = torch.cat([out[:, :PAD] + state.tail, out[:, PAD:]], dim=-1)
        state.tail = out[:, TICK * n:]
        return out[:, :TICK * n].to(latents.dtype), state


# ---- the codec --------------------------------------------------------------------------------
class MelPCACodec(nn.Module):
    """Encoder + analytic decoder over one basis, and the whitening the flow head sees.

    `encoder` and `decoder` each hold the basis (mean, components) as frozen buffers, `std` the
    per-dimension corpus std: `normalize(latent) = latent / std` (the latents are zero-mean on the
    corpus by construction), so a `michi.model.michi.LatentNorm` takes mean 0 and this std
    (`fill_latent_norm`).
    """

    def __init__(self, k: int = DEFAULT_K, seed: int = 0):
        super().__init__()
        self.k = k
        self.encoder = MelPCAEncoder(k)
        self.decoder = MelPCADecoder(k, seed)
        self.register_buffer("std", torch.ones(k))
        self.register_buffer("total_variance", torch.tensor(float("nan")))

    @classmethod
    def from_basis(cls, basis: MelPCABasis, seed: int = 0) -> "MelPCACodec":
        codec = cls(basis.k, seed)
        codec.load_basis(basis)
        return codec

    @torch.no_grad()
    def load_basis(self, basis: MelPCABasis) -> None:
        if basis.k != self.k:
            raise ValueError(f"basis has K = {basis.k}, the codec {self.k}")
        for part in (self.encoder, self.decoder):
            part.mean.copy_(basis.mean)
            part.components.copy_(basis.components)
        self.std.copy_(basis.std.clamp(min=1e-8))
        self.total_variance.fill_(basis.total_variance)

    @property
    def basis(self) -> MelPCABasis:
        return MelPCABasis(self.encoder.mean.detach().cpu(), self.encoder.components.detach().cpu(),
                           self.std.detach().cpu(), float(self.total_variance))

    def normalize(self, latent: Tensor) -> Tensor:
        return latent / self.std

    def denormalize(self, latent: Tensor) -> Tensor:
        return latent * self.std

    @torch.no_grad()
    def fill_latent_norm(self, latent_norm: nn.Module) -> None:
        """Set a LatentNorm (mean, std buffers) to this codec's whitening."""
        latent_norm.mean.zero_()
        latent_norm.std.copy_(self.std)

    def encode(self, audio: Tensor) -> Tensor:
        """Audio [B, T] -> raw latents [B, T // 1920, K]."""
        return self.encoder(audio).latents

    def decode(self, latents: Tensor) -> Tensor:
        """Raw latents [B, n, K] -> audio [B, n * 1920], delayed by DECODER_DELAY samples."""
        return self.decoder(latents)

    @torch.no_grad()
    def resynthesize(self, audio: Tensor | np.ndarray) -> Tensor:
        """Encode and decode mono or batched audio; the result is aligned with the input (the
        decoder's delay removed) and has its length."""
        x = torch.as_tensor(np.ascontiguousarray(audio) if isinstance(audio, np.ndarray) else audio).float()
        squeeze = x.dim() == 1
        x = x[None] if squeeze else x
        length = x.shape[-1]
        # Whole ticks, plus enough to flush the delay.
        padded = F.pad(x, (0, -(length + DECODER_DELAY) % TICK + DECODER_DELAY))
        y = self.decode(self.encode(padded))[:, DECODER_DELAY:DECODER_DELAY + length]
        return y[0] if squeeze else y
