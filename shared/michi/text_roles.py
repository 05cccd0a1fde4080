"""Text-only insertions: the roles a text can have and the positions the backbone reads for one.
One home for both, used by the Python API (`michi.api`) and the gateway (`services.gateway`)."""
from __future__ import annotations

ROLES = ("system", "user", "context", "tool", "agent")


def text_insertion(tokenizer, vocab, text: str, role: str) -> list[int]:
    """A text-only insertion as the backbone reads it: BOS, "role: text", EOS."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return [vocab.bos, *tokenizer.encode(f"{role}: {text}"), vocab.eos]
