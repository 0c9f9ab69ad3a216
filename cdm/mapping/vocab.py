"""Canonical token strings: the exact bytes each token contributes to text, whatever the tokenizer's spelling.

Canonical form of a token = (leading-space flag, body bytes): byte-level BPE pieces go back through the GPT-2
byte-to-unicode table, SentencePiece ``▁`` becomes a space and ``<0xNN>`` the byte NN, WordPiece ``##`` marks a
continuation (no space) while any other WordPiece token starts a word (space flag set), and anything else is
decoded after an anchor token whose text is then removed. The scheme is read from the tokenizer's JSON (model,
pre-tokenizer, decoder), never guessed from a name. Bodies are bytes, so invalid UTF-8 pieces stay distinct.

Kind codes (int8): 0 normal, 1 special (added special token), 2 byte-fallback piece (``<0xNN>``),
3 added non-special token, 4 missing (an id no token uses).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from cdm.mapping.tokenizers import LoadedTokenizer, backend_tokenizer

KIND_NORMAL, KIND_SPECIAL, KIND_BYTE, KIND_ADDED, KIND_MISSING = 0, 1, 2, 3, 4
KIND_LABELS = {KIND_NORMAL: "normal", KIND_SPECIAL: "special", KIND_BYTE: "byte-fallback", KIND_ADDED: "added", KIND_MISSING: "missing"}
#: kinds whose canonical form is text that can match another vocabulary's tokens
TEXT_KINDS = (KIND_NORMAL, KIND_BYTE, KIND_ADDED)
SCHEMES = ("byte-level", "sentencepiece", "wordpiece", "generic")

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_NOT_A_BYTE = "\uffff"  # translate target for characters outside the byte-level alphabet (fails latin-1 encoding)


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


def _byte_level_table() -> dict[int, str]:
    """str.translate table: alphabet character -> the latin-1 character of its byte; other latin-1 -> invalid."""
    table: dict[int, str] = {c: _NOT_A_BYTE for c in range(256)}
    table.update({ord(ch): chr(b) for b, ch in bytes_to_unicode().items()})
    return table


_BYTE_LEVEL = _byte_level_table()


@dataclass(frozen=True, eq=False)
class CanonicalVocab:
    """Per-id canonical form as flat arrays (saveable as they are) plus the special-token roles."""

    bodies: np.ndarray  # uint8 [total]: all bodies concatenated
    offsets: np.ndarray  # int64 [V+1]: body of id i = bodies[offsets[i]:offsets[i+1]]
    space: np.ndarray  # bool [V]: the token contributes a leading space before its body
    kind: np.ndarray  # int8 [V]: KIND_* codes
    scheme: str = "generic"
    roles: Mapping[str, int] = field(default_factory=dict)  # role -> id (eos, bos, pad, unk, eot, bot, ...)

    def __post_init__(self) -> None:
        v = len(self.kind)
        if self.offsets.shape != (v + 1,) or self.space.shape != (v,):
            raise ValueError(f"CanonicalVocab arrays disagree: {v} kinds, {len(self.space)} flags, {len(self.offsets)} offsets")
        if v and (self.offsets[0] != 0 or self.offsets[-1] != len(self.bodies) or (np.diff(self.offsets) < 0).any()):
            raise ValueError("CanonicalVocab offsets must start at 0, be non-decreasing and end at len(bodies)")

    def __len__(self) -> int:
        return len(self.kind)

    @classmethod
    def from_bodies(
        cls, bodies: Iterable[bytes], space: Iterable[bool], kind: Iterable[int], scheme: str = "generic", roles: Mapping[str, int] | None = None
    ) -> "CanonicalVocab":
        """Build from per-id Python values (tests, small vocabularies)."""
        blist = [bytes(b) for b in bodies]
        offsets = np.zeros(len(blist) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blist], out=offsets[1:])
        flat = np.frombuffer(b"".join(blist), dtype=np.uint8).copy()
        return cls(flat, offsets, np.asarray(list(space), dtype=bool), np.asarray(list(kind), dtype=np.int8), scheme, dict(roles or {}))

    @property
    def lengths(self) -> np.ndarray:
        """Body length in bytes per id (int64)."""
        return np.diff(self.offsets)

    def body(self, i: int) -> bytes:
        return self.bodies[self.offsets[i] : self.offsets[i + 1]].tobytes()

    def body_list(self) -> list[bytes]:
        raw = self.bodies.tobytes()
        o = self.offsets.tolist()
        return [raw[o[i] : o[i + 1]] for i in range(len(self))]

    def key(self, i: int) -> bytes:
        """The exact bytes the token contributes (leading space included)."""
        return (b" " if self.space[i] else b"") + self.body(i)

    def text(self, i: int, errors: str = "replace") -> str:
        """Leading space + body decoded; ``errors="replace"`` gives the reference's U+FFFD for partial bytes,
        ``"surrogateescape"`` keeps every invalid byte distinct."""
        return (" " if self.space[i] else "") + self.body(i).decode("utf-8", errors=errors)

    def body_texts(self, errors: str = "surrogateescape") -> list[str]:
        """Every body as a string (invalid bytes kept distinct by default), for edit distances."""
        return [b.decode("utf-8", errors=errors) for b in self.body_list()]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays to save (see `from_arrays`)."""
        return {"bodies": self.bodies, "offsets": self.offsets, "space": self.space, "kind": self.kind}

    def meta(self) -> dict[str, Any]:
        """JSON-able metadata to save beside the arrays."""
        return {"scheme": self.scheme, "roles": {k: int(v) for k, v in self.roles.items()}, "kinds": {str(k): v for k, v in KIND_LABELS.items()}}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> "CanonicalVocab":
        meta = meta or {}
        return cls(
            np.asarray(arrays["bodies"], dtype=np.uint8),
            np.asarray(arrays["offsets"], dtype=np.int64),
            np.asarray(arrays["space"], dtype=bool),
            np.asarray(arrays["kind"], dtype=np.int8),
            str(meta.get("scheme", "generic")),
            {str(k): int(v) for k, v in (meta.get("roles") or {}).items()},
        )

    def ids_with_role(self) -> dict[int, list[str]]:
        """id -> its roles."""
        out: dict[int, list[str]] = {}
        for role, i in self.roles.items():
            out.setdefault(int(i), []).append(role)
        return out


# ------------------------------------------------------------------------------------------ scheme detection


def _types(node: Any) -> list[dict]:
    """Every component dict (with a "type") inside a normalizer/pre-tokenizer/decoder spec, nested ones included."""
    out: list[dict] = []
    if isinstance(node, dict):
        if "type" in node:
            out.append(node)
        for v in node.values():
            out.extend(_types(v))
    elif isinstance(node, list):
        for v in node:
            out.extend(_types(v))
    return out


def detect_scheme(spec: Mapping[str, Any]) -> tuple[str, str]:
    """(scheme, marker) from a tokenizer.json dict: byte-level, sentencepiece (marker = the ``▁`` character),
    wordpiece (marker = the continuation prefix) or generic."""
    model = spec.get("model") or {}
    pre, dec, norm = _types(spec.get("pre_tokenizer")), _types(spec.get("decoder")), _types(spec.get("normalizer"))
    if any(c["type"] == "ByteLevel" for c in pre + dec):
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            return "generic", ""
        return "byte-level", ""
    if model.get("type") == "WordPiece":
        return "wordpiece", str(model.get("continuing_subword_prefix") or "##")
    for c in pre + dec:
        if c["type"] == "Metaspace":
            return "sentencepiece", str(c.get("replacement") or "▁")
    for c in dec:
        pattern = c.get("pattern") or {}
        if c["type"] == "Replace" and c.get("content") == " " and isinstance(pattern.get("String"), str):
            return "sentencepiece", pattern["String"]
    for c in norm:
        pattern = c.get("pattern") or {}
        if c["type"] == "Replace" and pattern.get("String") == " " and c.get("content"):
            return "sentencepiece", str(c["content"])
    return "generic", ""


def _has_byte_fallback(spec: Mapping[str, Any]) -> bool:
    model = spec.get("model") or {}
    return bool(model.get("byte_fallback")) or any(c["type"] == "ByteFallback" for c in _types(spec.get("decoder")))


# ------------------------------------------------------------------------------------------ canonicalisation


def _split_space(raw: bytes) -> tuple[bool, bytes]:
    return (True, raw[1:]) if raw.startswith(b" ") else (False, raw)


def resolve_roles(backend: Any, roles: Mapping[str, Any] | None) -> dict[str, int]:
    """Normalise a role table: names lose a ``_token`` suffix; values may be ids or token strings."""
    out: dict[str, int] = {}
    for name, value in (roles or {}).items():
        role = name[: -len("_token")] if name.endswith("_token") else name
        tid = backend.token_to_id(value) if isinstance(value, str) else value
        if isinstance(tid, (int, np.integer)) and int(tid) >= 0:
            out[role] = int(tid)
    return out


def canonical_vocab(tok: Any, roles: Mapping[str, Any] | None = None) -> CanonicalVocab:
    """Canonical (space, body, kind) for every id of a tokenizer (added tokens included) and its roles.

    ``tok``: a `tokenizers.Tokenizer` (roles from its ``cdm_roles`` attribute, set by `load_tokenizer`), a
    `LoadedTokenizer`, or a transformers fast tokenizer. ``roles`` overrides: {role or role_token: id or string}.
    """
    backend = backend_tokenizer(tok)
    if roles is None:
        if isinstance(tok, LoadedTokenizer):
            roles = tok.roles
        else:
            roles = getattr(tok, "cdm_roles", None)
            if roles is None and not hasattr(tok, "to_str"):  # a transformers wrapper
                from cdm.mapping.tokenizers import wrapper_roles

                roles = wrapper_roles(tok)
    spec = json.loads(backend.to_str())
    scheme, marker = detect_scheme(spec)
    byte_fallback = _has_byte_fallback(spec)
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1 if vocab else 0
    pieces: list[str | None] = [None] * size
    for piece, i in vocab.items():
        pieces[i] = piece
    added = backend.get_added_tokens_decoder()
    raws: list[bytes] = [b""] * size
    space = np.zeros(size, dtype=bool)
    kind = np.full(size, KIND_NORMAL, dtype=np.int8)
    generic: list[int] = []
    for i, piece in enumerate(pieces):
        if piece is None:
            kind[i] = KIND_MISSING
            continue
        a = added.get(i)
        if a is not None:
            if a.special:
                kind[i], raws[i] = KIND_SPECIAL, a.content.encode("utf-8")
            else:
                kind[i] = KIND_ADDED
                space[i], raws[i] = _split_space(a.content.encode("utf-8"))
            continue
        if byte_fallback and scheme != "byte-level":
            m = _BYTE_PIECE.match(piece)
            if m:
                kind[i] = KIND_BYTE
                space[i], raws[i] = _split_space(bytes([int(m.group(1), 16)]))
                continue
        if scheme == "byte-level":
            try:
                raw = piece.translate(_BYTE_LEVEL).encode("latin-1")
            except UnicodeEncodeError:  # a piece outside the byte alphabet: let the decoder tell its text
                generic.append(i)
                continue
            space[i], raws[i] = _split_space(raw)
        elif scheme == "sentencepiece":
            space[i], raws[i] = _split_space(piece.replace(marker, " ").encode("utf-8"))
        elif scheme == "wordpiece":
            if piece.startswith(marker) and len(piece) > len(marker):
                raws[i] = piece[len(marker) :].encode("utf-8")
            else:
                space[i], raws[i] = True, piece.encode("utf-8")
        else:
            generic.append(i)
    for i, raw in zip(generic, _decode_after_anchor(backend, generic, pieces, kind)):
        space[i], raws[i] = _split_space(raw)
    offsets = np.zeros(size + 1, dtype=np.int64)
    np.cumsum([len(r) for r in raws], out=offsets[1:])
    flat = np.frombuffer(b"".join(raws), dtype=np.uint8).copy()
    role_ids = {r: i for r, i in resolve_roles(backend, roles).items() if i < size}
    return CanonicalVocab(flat, offsets, space, kind, scheme, role_ids)


def _decode_after_anchor(backend: Any, ids: list[int], pieces: list[str | None], kind: np.ndarray) -> list[bytes]:
    """Generic rule: text of decode([anchor, id]) after the anchor's own text (keeps a leading space that a
    decoder would strip at the start of a text); decode([id]) when the anchor trick does not apply."""
    if not ids:
        return []
    anchor, base = None, ""
    for j, p in enumerate(pieces):
        if p is not None and kind[j] == KIND_NORMAL and p.isascii() and p.isalpha():
            text = backend.decode([j], skip_special_tokens=False)
            if text and text.strip() == text:
                anchor, base = j, text
                break
    if anchor is None:
        return [backend.decode([i], skip_special_tokens=False).encode("utf-8") for i in ids]
    both = backend.decode_batch([[anchor, i] for i in ids], skip_special_tokens=False)
    out = []
    for i, text in zip(ids, both):
        out.append((text[len(base) :] if text.startswith(base) else backend.decode([i], skip_special_tokens=False)).encode("utf-8"))
    return out


# ------------------------------------------------------------------------------------------ strings for DTW and reports


def token_text(cv: CanonicalVocab, i: int) -> str:
    """Reference-style display string of one id (leading space, invalid bytes as U+FFFD)."""
    return cv.text(int(i))


def token_strings(cv: CanonicalVocab, ids: Iterable[int], rule: str = "reference") -> list[str]:
    """Per-token strings for string-DTW: ``"reference"`` decodes partial UTF-8 pieces to U+FFFD (all equal, as the
    reference's tokens-to-string does); ``"exact"`` keeps each invalid byte distinct (surrogate escapes)."""
    if rule not in ("reference", "exact"):
        raise ValueError(f"token string rule must be 'reference' or 'exact', got {rule!r}")
    errors = "replace" if rule == "reference" else "surrogateescape"
    return [cv.text(int(i), errors=errors) for i in ids]


def special_roles(cv: CanonicalVocab, limit: int = 64) -> dict[str, Any]:
    """JSON-friendly description of the special tokens: roles -> ids and (up to ``limit``) id -> content."""
    ids = np.flatnonzero(cv.kind == KIND_SPECIAL)[:limit]
    return {"roles": {k: int(v) for k, v in cv.roles.items()}, "specials": {int(i): cv.text(int(i)) for i in ids}}
