"""Tokenise canonical texts with character offsets, normalise special-token spans, apply the length policy."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any, Sequence

import numpy as np

from cdm.errors import CdmError
from cdm.precompute.data import Canonical, SkipRecord

TRUNCATION_POLICIES = ("truncate", "skip")


class OffsetsUnavailable(CdmError, TypeError):
    """The tokenizer cannot report character offsets, which the store needs."""


_NO_OFFSETS = ("tokenizer {name} cannot return character offsets ({why}); cdm needs a fast (tokenizers-backed) "
               "tokenizer: load or convert one that has a tokenizer.json")


@dataclass
class Encoded:
    """A tokenised sequence: ids int32 [n], char spans int32 [n, 2] into `text`, trained spans, truncation flag."""

    text: str
    response_spans: np.ndarray
    token_ids: np.ndarray
    char_spans: np.ndarray
    truncated: bool


def encode_offsets(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batch-tokenise texts; return (ids int32 [n], char spans int32 [n, 2]) each, added specials as (p, p)."""
    if not texts:
        return []
    try:
        enc = tokenizer(list(texts), add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                        return_attention_mask=False)
    except (NotImplementedError, ValueError, TypeError) as e:
        raise OffsetsUnavailable(_NO_OFFSETS.format(name=type(tokenizer).__name__, why=e)) from e
    if "offset_mapping" not in enc:
        raise OffsetsUnavailable(_NO_OFFSETS.format(name=type(tokenizer).__name__, why="no offset_mapping returned"))
    out = []
    for ids, offs in zip(enc["input_ids"], enc["offset_mapping"]):  # fromiter: ~2x np.asarray on lists of tuples
        spans = np.fromiter(chain.from_iterable(offs), dtype=np.int32, count=2 * len(offs)).reshape(-1, 2)
        out.append((np.fromiter(ids, dtype=np.int32, count=len(ids)), normalise_spans(spans)))
    return out


def normalise_spans(spans: np.ndarray) -> np.ndarray:
    """Give zero-width tokens (added BOS/EOS, reported as (0, 0)) the empty span (p, p) at the previous end."""
    spans = np.array(spans, dtype=np.int32).reshape(-1, 2)
    empty = spans[:, 0] == spans[:, 1]
    if not empty.any():
        return spans
    # index of the last non-empty token at or before each position (-1: none yet), vectorised
    last = np.maximum.accumulate(np.where(empty, -1, np.arange(len(spans))))
    prev = np.where(last >= 0, spans[np.maximum(last, 0), 1], 0)
    spans[empty] = prev[empty, None]
    return spans


def check_offsets(tokenizer: Any) -> None:
    """Refuse a tokenizer without usable offsets (slow tokenizers, or offsets that do not index the text)."""
    probe = "Hello world, naïve 123."
    (ids, spans), = encode_offsets(tokenizer, [probe], add_special_tokens=False)
    if len(ids) == 0 or spans.max() > len(probe) or not np.any(spans[:, 1] > spans[:, 0]):
        raise OffsetsUnavailable(f"tokenizer {type(tokenizer).__name__} returned unusable offsets {spans.tolist()}")


def apply_length_policy(
    canonical: Canonical, ids: np.ndarray, spans: np.ndarray, max_length: int | None, policy: str = "truncate"
) -> Encoded:
    """Keep at most `max_length` tokens; truncation cuts the text at the last kept token and clips the spans.

    The cut never splits tokens that share characters (byte pieces of one character), so the stored text is
    exactly what the kept tokens cover. `policy="skip"` skips long sequences instead.
    """
    if policy not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation policy must be one of {TRUNCATION_POLICIES}, got {policy!r}")
    n = len(ids)
    if n == 0:
        raise SkipRecord("no tokens")
    if max_length is None or n <= max_length:
        return Encoded(canonical.text, canonical.response_spans, ids, spans, False)
    if policy == "skip":
        raise SkipRecord("longer than max_length")
    keep = max_length
    while 0 < keep < n and spans[keep, 0] < spans[keep - 1, 1]:
        keep -= 1
    if keep == 0:
        raise SkipRecord("longer than max_length")
    cut = int(spans[:keep, 1].max())
    resp = np.clip(canonical.response_spans, 0, cut)
    resp = resp[resp[:, 1] > resp[:, 0]]
    if len(resp) == 0:
        raise SkipRecord("no response within max_length")
    return Encoded(canonical.text[:cut], resp.astype(np.int32).reshape(-1, 2), ids[:keep], spans[:keep], True)
