"""Load a tokenizer from whatever a model ships (folder, tokenizer.json, SentencePiece model, GGUF), hash it,
and encode text with character offsets: the only tokenizer calls `build-map` needs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from tokenizers import Tokenizer

from cdm.errors import CdmError

#: roles read from a transformers wrapper's attributes (``<name>_token_id``), in priority order.
WRAPPER_ROLES = ("eos", "bos", "pad", "unk", "cls", "sep", "mask")

_USER_SENTINEL = "cdmusersentinelqz"
_ASSISTANT_SENTINEL = "cdmassistantsentinelqz"


@dataclass(frozen=True, eq=False)
class LoadedTokenizer:
    """A `tokenizers.Tokenizer` plus what only the surrounding files know: special-token roles, chat template."""

    tokenizer: Tokenizer
    roles: dict[str, int] = field(default_factory=dict)
    chat_template: str | None = None
    source: str = ""
    hf: Any = None  # the transformers wrapper it came from, when one was built


TokenizerLike = Union[Tokenizer, LoadedTokenizer, Any]


class TokenizerError(CdmError, ValueError):
    """A tokenizer cannot be loaded, or cannot give the character offsets alignment needs."""


def open_tokenizer(path: str | os.PathLike) -> LoadedTokenizer:
    """Load a HF tokenizer folder, a tokenizer.json, a SentencePiece ``.model`` or a ``.gguf`` file, with roles."""
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"tokenizer path {str(p)!r} does not exist")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".gguf":
            return _from_hf(_auto_tokenizer(p.parent, gguf_file=p.name), str(p))
        if suffix == ".json":
            if p.name == "tokenizer.json" and _has_config(p.parent):
                return _from_hf(_auto_tokenizer(p.parent), str(p))
            return _from_backend(_tokenizer_from_json(p), str(p))
        if suffix == ".model":
            return _from_hf(_sentencepiece_tokenizer(p), str(p))
        raise TokenizerError(
            f"{str(p)!r} is not a tokenizer: expected a folder, a tokenizer.json, a SentencePiece .model or a .gguf file"
        )
    if (p / "tokenizer.json").is_file():
        if _has_config(p):
            return _from_hf(_auto_tokenizer(p), str(p))
        return _from_backend(_tokenizer_from_json(p / "tokenizer.json"), str(p))
    if (p / "tokenizer.model").is_file():
        hf = _auto_tokenizer(p) if _has_config(p) else _sentencepiece_tokenizer(p / "tokenizer.model")
        return _from_hf(hf, str(p))
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return _from_hf(_auto_tokenizer(p, gguf_file=ggufs[0].name), str(p))
    if len(ggufs) > 1:
        raise TokenizerError(f"folder {str(p)!r} holds several .gguf files; pass the one to use: {[g.name for g in ggufs]}")
    raise TokenizerError(
        f"folder {str(p)!r} holds no tokenizer: expected tokenizer.json, tokenizer.model or one .gguf file"
    )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The `tokenizers.Tokenizer` at ``path`` (see `open_tokenizer`), padding and truncation disabled.

    Its roles travel with it as the attribute ``cdm_roles`` ({role: id}), which `canonical_vocab` reads.
    """
    loaded = open_tokenizer(path)
    loaded.tokenizer.cdm_roles = dict(loaded.roles)  # type: ignore[attr-defined]
    return loaded.tokenizer


def backend_tokenizer(tok: TokenizerLike) -> Tokenizer:
    """The `tokenizers.Tokenizer` behind a Tokenizer, a LoadedTokenizer or a transformers fast tokenizer."""
    if isinstance(tok, Tokenizer):
        return tok
    if isinstance(tok, LoadedTokenizer):
        return tok.tokenizer
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TokenizerError(
        f"{type(tok).__name__} has no `tokenizers` backend, so it cannot give character offsets; "
        "load the tokenizer with cdm.mapping.tokenizers.load_tokenizer or a fast transformers tokenizer"
    )


def tokenizer_json(tok: TokenizerLike) -> dict:
    """The tokenizer.json content as a dict, without the padding/truncation settings (not part of the model)."""
    data = json.loads(backend_tokenizer(tok).to_str())
    data.pop("padding", None)
    data.pop("truncation", None)
    return data


def tokenizer_hash(tok: TokenizerLike) -> str:
    """sha256 of the canonical tokenizer.json (sorted keys, compact, UTF-8; padding/truncation dropped)."""
    canonical = json.dumps(tokenizer_json(tok), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def encode_with_offsets(tok: TokenizerLike, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32[n] and character spans int32[n,2] of ``text``, with no special tokens added (no BOS)."""
    backend = backend_tokenizer(tok)
    if backend.truncation is not None:
        raise TokenizerError(
            f"tokenizer has truncation enabled ({backend.truncation}), which would silently drop tokens; "
            "call tokenizer.no_truncation() first"
        )
    enc = backend.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int32)
    spans = np.asarray(enc.offsets, dtype=np.int32).reshape(-1, 2)
    if backend.padding is not None:
        keep = np.asarray(enc.attention_mask, dtype=bool)
        ids, spans = ids[keep], spans[keep]
    if len(ids) and len(text) and not spans.any():
        raise TokenizerError("tokenizer returned no character offsets (every span is (0, 0)); it cannot be aligned")
    bad = (spans[:, 0] < 0) | (spans[:, 0] > spans[:, 1]) | (spans[:, 1] > len(text))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TokenizerError(
            f"tokenizer returned an invalid character span {tuple(spans[i])} for token {i} (id {ids[i]}) "
            f"of a {len(text)}-character text"
        )
    return ids, spans


def wrapper_roles(hf: Any) -> dict[str, int]:
    """Special-token roles declared by a transformers wrapper (bos/eos/pad/unk/...) plus chat markers.

    Chat markers come from rendering the wrapper's chat template on a sentinel conversation: ``eot`` is the
    added token right after the assistant content, ``bot`` the first other added token between the user
    content and the assistant content (the assistant-turn header). Nothing is looked up by name.
    """
    roles: dict[str, int] = {}
    for name in WRAPPER_ROLES:
        tid = getattr(hf, f"{name}_token_id", None)
        if isinstance(tid, int) and tid >= 0:
            roles[name] = tid
    roles.update(_chat_roles(hf))
    return roles


def _chat_roles(hf: Any) -> dict[str, int]:
    """``eot``/``bot`` ids found by rendering the chat template (empty when there is none or it fails)."""
    if not getattr(hf, "chat_template", None):
        return {}
    msgs = [{"role": "user", "content": _USER_SENTINEL}, {"role": "assistant", "content": _ASSISTANT_SENTINEL}]
    try:
        rendered = hf.apply_chat_template(msgs, tokenize=False)
    except Exception:  # templates raise for conversations they do not support: no chat roles then
        return {}
    if not isinstance(rendered, str) or _USER_SENTINEL not in rendered or _ASSISTANT_SENTINEL not in rendered:
        return {}
    backend = backend_tokenizer(hf)
    added = {int(k) for k in backend.get_added_tokens_decoder()}
    u_end = rendered.index(_USER_SENTINEL) + len(_USER_SENTINEL)
    a_start = rendered.index(_ASSISTANT_SENTINEL)
    a_end = a_start + len(_ASSISTANT_SENTINEL)
    roles: dict[str, int] = {}
    after = backend.encode(rendered[a_end:], add_special_tokens=False).ids
    if after and after[0] in added:
        roles["eot"] = after[0]
    between = [t for t in backend.encode(rendered[u_end:a_start], add_special_tokens=False).ids if t in added]
    between = [t for t in between if t != roles.get("eot")]
    if between:
        roles["bot"] = between[0]
    return roles


def _has_config(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"))


def _tokenizer_from_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{str(path)!r} is not a valid tokenizer.json: {exc}") from exc


def _auto_tokenizer(folder: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as exc:
        what = kwargs.get("gguf_file") or str(folder)
        raise TokenizerError(f"could not load a tokenizer from {what!r}: {exc}") from exc


def _sentencepiece_tokenizer(model_file: Path) -> Any:
    """Convert a bare SentencePiece model; the file must be named tokenizer.model in its folder to convert fully."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(str(model_file), os.path.join(tmp, "tokenizer.model"))
        try:
            return LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=False, add_eos_token=False)
        except Exception as exc:
            raise TokenizerError(f"{str(model_file)!r} is not a SentencePiece model: {exc}") from exc


def _from_hf(hf: Any, source: str) -> LoadedTokenizer:
    backend = backend_tokenizer(hf)  # the wrapper was built here, so changing its backend affects nobody else
    backend.no_padding()
    backend.no_truncation()
    return LoadedTokenizer(backend, wrapper_roles(hf), getattr(hf, "chat_template", None) or None, source, hf)


def _from_backend(backend: Tokenizer, source: str) -> LoadedTokenizer:
    backend.no_padding()
    backend.no_truncation()
    return LoadedTokenizer(backend, {}, None, source, None)
