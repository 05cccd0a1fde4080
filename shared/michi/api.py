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
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .audio.io import as_mono_float32, resample
from .checkpoint import CONFIG_FILE, listen_text_trained, load_checkpoint
from .config import MichiConfig, preset
from .engine import BackboneEngine, TickInput
from .model.backbone import backbone_config_from_hf
from .model.lexicon import LEXICON_FILE, Lexicon
from .model.michi import BASIS_NOT_FITTED, MichiModel
from .model.textlm import LM_FILE, CharLM
from .model.tokenizer import StreamVocab, Tokenizer, load_tokenizer
from .model.wordlm import WORD_LM_FILE, WordLM
from .text_roles import ROLES, text_insertion  # noqa: F401 - ROLES: the API's role table
from .transcript import HeadTranscriber

UNTRAINED_WARNING = ("this model has UNTRAINED (random) weights: its audio is noise and its text is "
                     "random bytes. Train one (issue: training recipe) or load a trained checkpoint.")
BASIS_WARNING = BASIS_NOT_FITTED  # a mel-PCA model with no basis (see michi.model.michi)


class Michi:
    """A loaded model with its tokenizer, ready to open sessions."""

    def __init__(self, model: MichiModel, info: dict[str, Any] | None = None):
        self.model = model.eval()
        self.cfg: MichiConfig = model.cfg
        self.info = info or {"trained": False}
        self.tokenizer: Tokenizer = load_tokenizer(self.cfg.backbone.tokenizer, self.cfg.backbone.vocab_size)
        self.vocab = StreamVocab(self.cfg.backbone.vocab_size)
        self.model.listen_text.enabled = self.hears_text
        self.text_lm: CharLM | None = None  # michi.model.textlm: set by `load` where the checkpoint has one
        self.lexicon: Lexicon | None = None  # michi.model.lexicon: likewise (with the LM, the phoneme decoder's)
        self.word_lm: WordLM | None = None  # michi.model.wordlm: likewise (the phoneme decoder's, over text_lm)

    @property
    def trained(self) -> bool:
        return bool(self.info.get("trained"))

    @property
    def hears_text(self) -> bool:
        """Whether the listen text head was trained on this model's latent, so that the user text
        it emits (the backbone's user text stream, `UserTranscript`) means something. A learned
        codec trains it with the codec; a mel-PCA model's checkpoint says so in its info
        (`checkpoint.listen_text_trained`). An untrained head emits nothing: its random tokens,
        fed to a backbone trained without user text, would steer what the agent says."""
        return listen_text_trained(self.cfg, self.info)

    @property
    def basis_fitted(self) -> bool:
        """False for a mel-PCA model whose basis was never fitted: its audio is noise."""
        return self.model.basis_fitted

    @property
    def warnings(self) -> list[str]:
        """What is wrong with these weights, for the user to see before any audio."""
        return ([] if self.trained else [UNTRAINED_WARNING]) + ([] if self.basis_fitted else [BASIS_WARNING])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def session(self, **options: Any) -> "Session":
        return Session(self, **options)

    def parameter_counts(self) -> dict[str, int]:
        return self.model.parameter_counts()


# The model this project trained and ships (its card: weights/michi-tiny/MODEL_CARD.md).
DEFAULT_MODEL = Path(__file__).parent / "weights" / "michi-tiny"


def resolve_source(source: str | Path) -> str | Path:
    """"default" -> the shipped model's directory; anything else unchanged."""
    if str(source) != "default":
        return source
    if not (DEFAULT_MODEL / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"the default model is missing from {DEFAULT_MODEL}; reinstall michi, or "
                                f"name a preset (tiny, full) or a checkpoint directory")
    return DEFAULT_MODEL


def config_of(source: str | Path = "default") -> tuple[MichiConfig, dict[str, Any]]:
    """The config and info of a source ("default", a preset or a checkpoint) without its weights."""
    from .checkpoint import read_checkpoint_config

    path = Path(resolve_source(source))
    if (path / CONFIG_FILE).is_file():
        return read_checkpoint_config(path)
    return preset(str(source)), {"trained": False, "weights": "random init"}


_SHARED: dict[tuple[str, int], Any] = {}


def _shared(loader, path: Path) -> Any:
    """One object per file (and version of it) per process: the models loaded from one checkpoint
    share its LM and lexicon, which decoders only read (the lexicon's LM look-ahead, seconds to
    compute, is then computed once)."""
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _SHARED:
        _SHARED[key] = loader(path)
    return _SHARED[key]


def load(source: str | Path = "default", device: str = "cpu", backbone: str | Path | None = None,
         seed: int = 0) -> Michi:
    """`source` is "default" (the trained model shipped with michi), a preset name ("tiny",
    "full", "tiny-melpca": random weights, seeded; a mel-PCA preset's basis is not fitted, which a
    RuntimeWarning says) or a Michi checkpoint directory. `backbone` initialises the backbone
    (shape and weights) from a local Hugging Face Llama-family checkpoint directory, e.g.
    SmolLM2-360M; the heads stay random."""
    path = Path(resolve_source(source))
    if (path / CONFIG_FILE).is_file():
        if backbone is not None:
            raise ValueError("backbone= only applies to a preset; a checkpoint carries its own backbone")
        model, info = load_checkpoint(path, device=device)
        michi = Michi(model, info)
        if (path / LM_FILE).is_file():  # the character LM its listen text head decodes with
            michi.text_lm = _shared(CharLM.load, path / LM_FILE)
        if (path / LEXICON_FILE).is_file():  # the words its phoneme CTC decodes into
            michi.lexicon = _shared(Lexicon.load, path / LEXICON_FILE)
        if michi.text_lm is not None and (path / WORD_LM_FILE).is_file():  # the words' trigram LM, spelling by text_lm
            michi.word_lm = _shared(lambda p: WordLM.load(p, michi.text_lm), path / WORD_LM_FILE)
        return _flag_basis(michi)
    if path.exists():
        raise FileNotFoundError(f"{path} is not a Michi checkpoint directory (no {CONFIG_FILE})")
    cfg = preset(str(source))
    info: dict[str, Any] = {"trained": False, "weights": f"random init, seed {seed}"}
    if backbone is not None:
        cfg.backbone = backbone_config_from_hf(backbone)
        info["weights"] += f"; backbone from {backbone}"
    torch.manual_seed(seed)
    return _flag_basis(Michi(MichiModel(cfg).to(device), info))


def _flag_basis(michi: Michi) -> Michi:
    """A mel-PCA model without a basis loads (training starts from one) but says so wherever it is
    loaded to make audio: the CLI, the stages, a Session."""
    if not michi.basis_fitted:
        warnings.warn(BASIS_WARNING, RuntimeWarning, stacklevel=3)
    return michi


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
    """One call: the streaming state of every part, and the queues of what was pushed in. The
    backbone side is a one-row `BackboneEngine`, the same code the backbone stage batches.

    Not thread-safe; one session per call. All inputs are consumed at the next `step()`."""

    KEY = "session"

    def __init__(self, michi: Michi, seed: int = 0, text_temperature: float = 0.8, top_k: int = 50,
                 audio_temperature: float | None = None, euler_steps: int | None = None,
                 cfg_scale: float | None = None, max_pad_ticks: int = 2, profile: bool = False):
        self.michi = michi
        m = michi.model
        self.device = michi.device
        self.profile = profile
        self.frame = michi.cfg.frame_samples
        self.max_pad_ticks = max_pad_ticks
        if not michi.basis_fitted:
            warnings.warn(BASIS_WARNING, RuntimeWarning, stacklevel=3)
        self.engine = BackboneEngine(m, rows=1, euler_steps=euler_steps, cfg_scale=cfg_scale)
        self.engine.open(self.KEY, seed=seed, text_temperature=text_temperature, top_k=top_k,
                         audio_temperature=audio_temperature, max_pad_ticks=max_pad_ticks)
        self.heard = HeadTranscriber(michi)  # what the user says, as text (the listen text head)
        with torch.inference_mode():
            self.listen_state = m.listen.init_state(1, device=self.device)
            self.vocoder_state = m.vocoder.init_state(1, device=self.device)
        self.user_audio = np.zeros(0, dtype=np.float32)
        self.pending_text: list[int] = []
        self.prompt: deque[torch.Tensor] = deque()  # raw agent latents to teacher-force, one per tick
        self.ticks = 0

    @property
    def position(self) -> int:
        """Backbone positions (ticks and text-only) in this call's KV cache."""
        return self.engine.position(self.KEY)

    @property
    def forced_pending(self) -> int:
        """Forced (TTS) tokens not yet spoken."""
        return self.engine.forced_pending(self.KEY)

    @property
    def phones_pending(self) -> int:
        """Phonemes of the forced text not yet spoken (models with a phoneme stream)."""
        return self.engine.phones_pending(self.KEY)

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
        self.pending_text += text_positions(self.michi, text, role)

    def force_agent_text(self, text: str) -> None:
        """Causal TTS: these tokens replace the agent's own text as fast as it asks for text."""
        self.engine.force_text(self.KEY, self.michi.tokenizer.encode(text))

    def prompt_agent_audio(self, pcm: np.ndarray, sample_rate_hz: int = 24_000) -> int:
        """Audio continuation: the agent's own audio for the next ticks is this prompt (teacher
        forced), so it goes on in that voice. Returns the number of prompt ticks."""
        pcm = resample(as_mono_float32(pcm), sample_rate_hz, self.michi.cfg.sample_rate_hz)
        pcm = pcm[: len(pcm) // self.frame * self.frame]
        with torch.inference_mode():
            latents = self.michi.model.listen(torch.from_numpy(pcm).to(self.device)[None]).latents[0]
        self.prompt.extend(latents)  # each becomes a tick's TickInput.forced_latent
        return latents.shape[0]

    # ---- one tick -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> Tick:
        m, v = self.michi.model, self.michi.vocab
        timings: dict[str, float] = {}
        clock = _Clock(timings, self.profile, self.device)
        start = time.perf_counter()
        if self.pending_text:
            self.engine.insert_text(self.KEY, self.pending_text)
            self.pending_text = []
            clock.lap("text_prefill")

        chunk, self.user_audio = self.user_audio[: self.frame], self.user_audio[self.frame:]
        chunk = np.pad(chunk, (0, self.frame - len(chunk)))
        (user_latent, features), self.listen_state = m.listen.step(
            torch.from_numpy(chunk).to(self.device)[None], self.listen_state)
        clock.lap("listen_encoder")
        (heard,) = self.heard.push(chunk, features[0])
        clock.lap("listen_text_head")

        users = heard.tokens
        forced = self.prompt.popleft() if self.prompt else None
        out = self.engine.tick({self.KEY: TickInput(user_latent[0, 0], users, forced)}, lap=clock.lap)[self.KEY]
        audio, self.vocoder_state = m.vocoder.step(out.agent_latent[None, None], self.vocoder_state)
        clock.lap("vocoder")
        if self.profile:
            timings["tick"] = (time.perf_counter() - start) * 1e3
        tok = out.agent_token
        tick = Tick(index=self.ticks, agent_audio=audio[0].float().cpu().numpy(), agent_token=tok,
                    agent_text=self.michi.tokenizer.decode([tok]) if v.is_text(tok) else "",
                    user_tokens=users, user_text=heard.text, timings_ms=timings)
        self.ticks += 1
        return tick

    # ---- text in, text out --------------------------------------------------------------------
    def generate_text(self, max_tokens: int = 64) -> str:
        """Continue the pending text as a plain LM on text-only positions (no audio), until EOS."""
        v = self.michi.vocab
        ids = self.pending_text[:-1] if self.pending_text and self.pending_text[-1] == v.eos else self.pending_text
        self.pending_text = []
        return self.michi.tokenizer.decode(self.engine.generate_text(self.KEY, ids, max_tokens))


def text_positions(michi: Michi, text: str, role: str) -> list[int]:
    """A text-only insertion as the backbone reads it: BOS, "role: text", EOS (`michi.text_roles`)."""
    return text_insertion(michi.tokenizer, michi.vocab, text, role)


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
