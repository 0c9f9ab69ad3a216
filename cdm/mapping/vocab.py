"""Canonical token strings: the exact bytes each token contributes to text, independent of the tokenizer's spelling.

Canonical form of a token = (leading-space flag, body bytes). Byte-level BPE pieces are mapped back through the
GPT-2 byte-to-unicode table, SentencePiece `▁` becomes a space and `<0xNN>` the byte NN, WordPiece `##` marks a
continuation (no space) and other WordPiece tokens start a word (space). The tokenizer's model type is read from
its JSON (model, pre-tokenizer, decoder), never guessed from its name. Invalid UTF-8 bodies stay bytes, so two
different partial pieces of a character never compare equal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KIND_NORMAL, KIND_SPECIAL, KIND_BYTE, KIND_ADDED = 0, 1, 2, 3
KIND_LABELS = {KIND_NORMAL: "normal", KIND_SPECIAL: "special", KIND_BYTE: "byte-fallback", KIND_ADDED: "added"}
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: every byte gets a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


@dataclass
class CanonicalVocab:
    """Per-id canonical form; ``roles`` maps bos/eos/pad/unk to ids where the tokenizer declares them."""

    bodies: list[bytes]
    space: np.ndarray  # bool [V]
    kind: np.ndarray  # int8 [V]
    scheme: str
    roles: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.bodies)

    def text(self, i: int) -> str:
        """Display/DTW string: a leading space when flagged, then the body decoded (invalid bytes -> U+FFFD)."""
        return (" " if self.space[i] else "") + self.bodies[i].decode("utf-8", errors="replace")

    def key(self, i: int) -> bytes:
        return (b" " if self.space[i] else b"") + self.bodies[i]

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """Bodies as one uint8 buffer + int64 offsets (for saving)."""
        offsets = np.zeros(len(self.bodies) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in self.bodies], out=offsets[1:])
        return np.frombuffer(b"".join(self.bodies), dtype=np.uint8), offsets


def _has_type(node: Any, name: str) -> bool:
    if isinstance(node, dict):
        if node.get("type") == name:
            return True
        return any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


def detect_scheme(spec: dict[str, Any]) -> str:
    """'byte-level', 'sentencepiece', 'wordpiece' or 'generic', from the tokenizer JSON."""
    model = spec.get("model", {}).get("type")
    dec, pre, norm = spec.get("decoder"), spec.get("pre_tokenizer"), spec.get("normalizer")
    if _has_type(dec, "ByteLevel") or _has_type(pre, "ByteLevel"):
        return "byte-level"
    if model == "WordPiece" or _has_type(dec, "WordPiece"):
        return "wordpiece"
    if _has_type(dec, "Metaspace") or _has_type(pre, "Metaspace") or _has_type(dec, "ByteFallback") or "▁" in json.dumps(norm or {}):
        return "sentencepiece"
    if _has_type(dec, "Replace") and "▁" in json.dumps(dec):
        return "sentencepiece"
    return "generic"


def _split_space(body: bytes) -> tuple[bool, bytes]:
    if body.startswith(b" "):
        return True, body[1:]
    return False, body


def canonical_vocab(tok: Any, roles: dict[str, str] | None = None) -> CanonicalVocab:
    """Canonical (space, body) for every id of a `tokenizers.Tokenizer` (added tokens included)."""
    spec = json.loads(tok.to_str())
    scheme = detect_scheme(spec)
    size = tok.get_vocab_size(with_added_tokens=True)
    vocab = tok.get_vocab(with_added_tokens=True)
    pieces: list[str | None] = [None] * max(size, (max(vocab.values()) + 1) if vocab else 0)
    for piece, i in vocab.items():
        pieces[i] = piece
    added = {int(a["id"]): a for a in spec.get("added_tokens", [])}
    wp_prefix = "##"
    if scheme == "wordpiece":
        wp_prefix = (spec.get("decoder") or {}).get("prefix") or spec.get("model", {}).get("continuing_subword_prefix") or "##"
    bodies: list[bytes] = []
    space = np.zeros(len(pieces), dtype=bool)
    kind = np.zeros(len(pieces), dtype=np.int8)
    for i, piece in enumerate(pieces):
        if piece is None:  # a hole in the id space: never produced, never matches
            bodies.append(b"")
            kind[i] = KIND_SPECIAL
            continue
        if i in added:
            a = added[i]
            bodies.append(a["content"].encode("utf-8"))
            kind[i] = KIND_SPECIAL if a.get("special") else KIND_ADDED
            if not a.get("special"):
                sp, body = _split_space(bodies[-1])
                space[i], bodies[-1] = sp, body
            continue
        if scheme == "byte-level":
            try:
                raw = bytes(UNICODE_TO_BYTE[c] for c in piece)
            except KeyError:
                raw = piece.encode("utf-8")
            space[i], body = _split_space(raw)
        elif scheme == "sentencepiece":
            m = _BYTE_PIECE.match(piece)
            if m:
                body = bytes([int(m.group(1), 16)])
                kind[i] = KIND_BYTE
                space[i], body = _split_space(body)
            else:
                space[i], body = _split_space(piece.replace("▁", " ").encode("utf-8"))
        elif scheme == "wordpiece":
            if piece.startswith(wp_prefix):
                body, space[i] = piece[len(wp_prefix):].encode("utf-8"), False
            else:
                body, space[i] = piece.encode("utf-8"), True
        else:
            body = _generic_body(tok, i)
            space[i], body = _split_space(body)
        bodies.append(body)
    role_ids: dict[str, int] = {}
    for role, content in (roles if roles is not None else getattr(tok, "cdm_roles", {}) or {}).items():
        tid = vocab.get(content)
        if tid is not None:
            role_ids[role.replace("_token", "")] = int(tid)
    return CanonicalVocab(bodies=bodies, space=space, kind=kind, scheme=scheme, roles=role_ids)


def _generic_body(tok: Any, i: int) -> bytes:
    """Fallback: decode [anchor, id] and remove the anchor's own text."""
    anchor_ids = tok.encode("a", add_special_tokens=False).ids
    if not anchor_ids:
        return tok.decode([i], skip_special_tokens=False).encode("utf-8")
    base = tok.decode(anchor_ids, skip_special_tokens=False)
    both = tok.decode(anchor_ids + [i], skip_special_tokens=False)
    return both[len(base):].encode("utf-8") if both.startswith(base) else tok.decode([i]).encode("utf-8")


def special_roles(cv: CanonicalVocab) -> dict[str, Any]:
    """JSON-friendly description of the special tokens: roles -> ids and the list of special contents."""
    specials = {int(i): cv.bodies[i].decode("utf-8", errors="replace") for i in np.flatnonzero(cv.kind == KIND_SPECIAL) if cv.bodies[i]}
    return {"roles": cv.roles, "specials": dict(list(specials.items())[:64])}


def token_text(cv: CanonicalVocab, i: int) -> str:
    return cv.text(i)
