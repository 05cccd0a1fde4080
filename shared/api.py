"""The Python API: load a model, open a session, push user audio or text, pull agent audio and text
tick by tick.

    import michi
    model = michi.load("tiny")                 # a preset (random weights) or a checkpoint directory
    session = model.session(seed=0)
    session.push_text("You are a helpful agent.", role="system")
    session.push_audio(pcm, sample_rate_hz=16_000)
    for _ in range(25):                        # 25 ticks = 2 s
        tick = session.step()
        play(tick.agent_audio); print(tick.agent_text, end="")
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .audio.io import as_mono_float32, resample
from .checkpoint import CONFIG_FILE, load_checkpoint
from .config import MichiConfig, preset
from .model.backbone import backbone_config_from_hf
from .model.michi import MichiModel
from .model.tokenizer import StreamVocab, Tokenizer, load_tokenizer

UNTRAINED_WARNING = ("this model has UNTRAINED (random) weights: its audio is noise and its text is "
                     "random bytes. Train one (issue: training recipe) or load a trained checkpoint.")
ROLES = ("system", "user", "context", "tool", "agent")


class Michi:
    """A loaded model with its tokenizer, ready to open sessions."""

    def __init__(self, model: MichiModel, info: dict[str, Any] | None = None):
        self.model = model.eval()
        self.cfg: MichiConfig = model.cfg
        self.info = info or {"trained": False}
        self.tokenizer: Tokenizer = load_tokenizer(self.cfg.backbone.tokenizer, self.cfg.backbone.vocab_size)
        self.vocab = StreamVocab(self.cfg.backbone.vocab_size)

    @property
    def trained(self) -> bool:
        return bool(self.info.get("trained"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def session(self, **options: Any) -> "Session":
        return Session(self, **options)

    def parameter_counts(self) -> dict[str, int]:
        return self.model.parameter_counts()


def load(source: str | Path = "tiny", device: str = "cpu", backbone: str | Path | None = None,
         seed: int = 0) -> Michi:
    """`source` is a preset name ("tiny", "full": random weights, seeded) or a Michi checkpoint
    directory. `backbone` initialises the backbone (shape and weights) from a local Hugging Face
    Llama-family checkpoint directory, e.g. SmolLM2-360M; the heads stay random."""
    path = Path(source)
    if (path / CONFIG_FILE).is_file():
        if backbone is not None:
            raise ValueError("backbone= only applies to a preset; a checkpoint carries its own backbone")
        model, info = load_checkpoint(path, device=device)
        return Michi(model, info)
    if path.exists():
        raise FileNotFoundError(f"{path} is not a Michi checkpoint directory (no {CONFIG_FILE})")
    cfg = preset(str(source))
    info: dict[str, Any] = {"trained": False, "weights": f"random init, seed {seed}"}
    if backbone is not None:
        cfg.backbone = backbone_config_from_hf(backbone)
        info["weights"] += f"; backbone from {backbone}"
    torch.manual_seed(seed)
    return Michi(MichiModel(cfg).to(device), info)


@dataclass
class Tick:
    """What one 80 ms tick produced."""

    index: int
    agent_audio: np.ndarray  # float32, FRAME_SAMPLES samples at 24 kHz
    agent_token: int
    agent_text: str  # "" when the agent emitted a stream token (PAD, EPAD...)
    user_tokens: list[int]
    user_text: str
    timings_ms: dict[str, float] = field(default_factory=dict)


class Session:
    """One call: the streaming state of every part, and the queues of what was pushed in.

    Not thread-safe; one session per call. All inputs are consumed at the next `step()`."""

    def __init__(self, michi: Michi, seed: int = 0, text_temperature: float = 0.8, top_k: int = 50,
                 audio_temperature: float | None = None, euler_steps: int | None = None,
                 cfg_scale: float | None = None, max_pad_ticks: int = 2, profile: bool = False):
        self.michi = michi
        m = michi.model
        self.device = michi.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.text_temperature, self.top_k = text_temperature, top_k
        self.flow = dict(temperature=audio_temperature, steps=euler_steps, cfg_scale=cfg_scale)
        self.max_pad_ticks = max_pad_ticks
        self.profile = profile
        self.frame = michi.cfg.frame_samples
        vocab = michi.vocab
        with torch.inference_mode():
            self.backbone_state = m.backbone.init_state()
            self.listen_state = m.listen.init_state(1, device=self.device)
            self.listen_text_state = m.listen_text.init_state(1, device=self.device)
            self.vocoder_state = m.vocoder.init_state(1, device=self.device)
        self.ctc_last = m.listen_text.initial_last_token(1, device=self.device)
        self.agent_token = torch.tensor([vocab.pad], device=self.device)
        self.agent_latent = torch.zeros(1, michi.cfg.latent_dim, device=self.device)  # normalised space
        self.user_audio = np.zeros(0, dtype=np.float32)
        self.pending_text: list[int] = []
        self.forced_text: deque[int] = deque()
        self.prompt_latents: deque[torch.Tensor] = deque()
        self.pad_run = 0
        self.ticks = 0

    # ---- inputs -------------------------------------------------------------------------------
    def push_audio(self, pcm: np.ndarray, sample_rate_hz: int = 24_000) -> None:
        """User audio, any length; resampled to 24 kHz and consumed 80 ms per tick. Each call is
        resampled on its own, so push whole utterances (or 24 kHz audio) here; a live stream at
        another rate belongs to the listen stage, which resamples with state."""
        pcm = resample(as_mono_float32(pcm), sample_rate_hz, self.michi.cfg.sample_rate_hz)
        self.user_audio = np.concatenate([self.user_audio, pcm])

    def push_text(self, text: str, role: str = "user") -> None:
        """Text-only positions (system prompt, retrieved context, tool result, typed user text),
        inserted into the backbone before the next tick."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        v = self.michi.vocab
        self.pending_text += [v.bos, *self.michi.tokenizer.encode(f"{role}: {text}"), v.eos]

    def force_agent_text(self, text: str) -> None:
        """Causal TTS: these tokens replace the agent's own text as fast as it asks for text."""
        self.forced_text.extend(self.michi.tokenizer.encode(text))

    def prompt_agent_audio(self, pcm: np.ndarray, sample_rate_hz: int = 24_000) -> int:
        """Audio continuation: the agent's own audio for the next ticks is this prompt (teacher
        forced), so it goes on in that voice. Returns the number of prompt ticks."""
        pcm = resample(as_mono_float32(pcm), sample_rate_hz, self.michi.cfg.sample_rate_hz)
        pcm = pcm[: len(pcm) // self.frame * self.frame]
        m = self.michi.model
        with torch.inference_mode():
            latents, _ = m.listen(torch.from_numpy(pcm).to(self.device)[None])
            for latent in m.latent_norm.normalize(latents[0]):
                self.prompt_latents.append(latent[None])
        return latents.shape[1]

    # ---- one tick -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> Tick:
        m, v = self.michi.model, self.michi.vocab
        timings: dict[str, float] = {}
        clock = _Clock(timings, self.profile, self.device)
        start = time.perf_counter()
        if self.pending_text:
            ids = torch.tensor([self.pending_text], device=self.device)
            self.pending_text = []
            m.backbone(m.backbone.embed_text(ids), self.backbone_state)
            clock.lap("text_prefill")

        chunk, self.user_audio = self.user_audio[: self.frame], self.user_audio[self.frame:]
        chunk = np.pad(chunk, (0, self.frame - len(chunk)))
        (user_latent, features), self.listen_state = m.listen.step(
            torch.from_numpy(chunk).to(self.device)[None], self.listen_state)
        clock.lap("listen_encoder")
        text_logits, self.listen_text_state = m.listen_text.step(features, self.listen_text_state)
        user_tokens, self.ctc_last = m.listen_text.greedy_step(text_logits[:, 0], self.ctc_last)
        clock.lap("listen_text_head")

        fused = m.backbone.embed_tick(self.agent_token, self.agent_latent,
                                      m.latent_norm.normalize(user_latent[:, 0]), user_tokens)
        hidden = m.backbone(fused, self.backbone_state)[:, -1]
        clock.lap("backbone")
        token = self._next_token(m.backbone.text_logits(hidden))
        clock.lap("text_head")
        latent = m.speak_head.sample(hidden, generator=self.generator, **self.flow)
        if self.prompt_latents:  # teacher-forced audio prompt
            latent = self.prompt_latents.popleft()
        clock.lap("speak_head")
        audio, self.vocoder_state = m.vocoder.step(m.latent_norm.denormalize(latent)[:, None], self.vocoder_state)
        clock.lap("vocoder")

        self.agent_token, self.agent_latent = token, latent
        if self.profile:
            clock.lap("output")
            timings["tick"] = (time.perf_counter() - start) * 1e3
        tok, users = int(token[0]), [int(t) for t in user_tokens[0] if t >= 0]
        tick = Tick(index=self.ticks, agent_audio=audio[0].float().cpu().numpy(), agent_token=tok,
                    agent_text=self.michi.tokenizer.decode([tok]) if v.is_text(tok) else "",
                    user_tokens=users, user_text=self.michi.tokenizer.decode(users), timings_ms=timings)
        self.ticks += 1
        return tick

    def _next_token(self, logits: torch.Tensor) -> torch.Tensor:
        v = self.michi.vocab
        token = sample_token(logits, self.text_temperature, self.top_k, self.generator)
        if self.forced_text:
            asks_for_text = v.is_text(int(token[0])) or int(token[0]) == v.epad
            if asks_for_text or self.pad_run >= self.max_pad_ticks:
                token = torch.tensor([self.forced_text.popleft()], device=self.device)
        self.pad_run = self.pad_run + 1 if int(token[0]) == v.pad else 0
        return token

    # ---- text in, text out --------------------------------------------------------------------
    @torch.inference_mode()
    def generate_text(self, max_tokens: int = 64) -> str:
        """Continue the pending text as a plain LM on text-only positions (no audio), until EOS."""
        m, v = self.michi.model, self.michi.vocab
        ids = self.pending_text[:-1] if self.pending_text and self.pending_text[-1] == v.eos else self.pending_text
        self.pending_text = []
        if not ids:
            ids = [v.bos]
        out: list[int] = []
        not_eos = torch.arange(v.base, v.size, device=self.device) != v.eos
        step_ids = torch.tensor([ids], device=self.device)
        for _ in range(max_tokens):
            hidden = m.backbone(m.backbone.embed_text(step_ids), self.backbone_state)[:, -1]
            logits = m.backbone.text_logits(hidden)
            logits[:, v.base:] = logits[:, v.base:].masked_fill(not_eos, float("-inf"))  # text or end
            token = sample_token(logits, self.text_temperature, self.top_k, self.generator)
            if int(token[0]) == v.eos:
                break
            out.append(int(token[0]))
            step_ids = token[None]
        return self.michi.tokenizer.decode(out)


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)[:, 0]


class _Clock:
    """Per-part wall time of a tick, only when profiling (costs nothing otherwise)."""

    def __init__(self, timings: dict[str, float], enabled: bool, device: torch.device):
        self.timings, self.enabled = timings, enabled
        self.sync = enabled and device.type == "cuda"
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.enabled:
            if self.sync:  # GPU work is asynchronous: wait for it, or the lap times nothing
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.timings[name] = (now - self.last) * 1e3
            self.last = now
