"""Field specifications: the dtype, per-row shape and Zarr v3 codec pipeline of one ragged token-level array."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr.codecs


def blosc_zstd(level: int = 3, shuffle: str = "shuffle", typesize: int | None = None) -> zarr.codecs.BloscCodec:
    """Blosc with zstd: ~3x faster writes and ~2x faster reads than bare Zstd at a similar ratio (measured)."""
    kw: dict[str, Any] = {"cname": "zstd", "clevel": level, "shuffle": shuffle}
    if typesize is not None:
        kw["typesize"] = typesize
    return zarr.codecs.BloscCodec(**kw)


def zstd(level: int = 3) -> zarr.codecs.ZstdCodec:
    """Bare Zstd (zarr v3 spec codec; numcodecs codecs warn under -W error, so only spec codecs are used)."""
    return zarr.codecs.ZstdCodec(level=level)


@dataclass(frozen=True)
class FieldSpec:
    """One token-level array: `dtype`, trailing shape per row (``()`` or ``(K,)`` ...), and its compressors."""

    dtype: str
    tail: tuple[int, ...] = ()
    compressors: tuple[Any, ...] = field(default_factory=lambda: (blosc_zstd(),))

    def check(self, name: str, arr: np.ndarray, where: str = "") -> None:
        """Refuse an array whose dtype or trailing shape differs from the spec, naming the field."""
        if arr.dtype != np.dtype(self.dtype):
            raise ValueError(f"{where}field {name!r}: dtype {arr.dtype} but the store expects {self.dtype}")
        if tuple(arr.shape[1:]) != tuple(self.tail):
            raise ValueError(
                f"{where}field {name!r}: per-row shape {tuple(arr.shape[1:])} but the store expects {tuple(self.tail)}"
            )

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "tail": list(self.tail), "compressors": [c.to_dict() for c in self.compressors]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "FieldSpec":
        """The spec recorded in a manifest (``to_json``), with its compressors rebuilt as zarr codecs.

        A Blosc ``typesize`` of 1 is the placeholder of a codec not yet bound to an array (zarr fills it from the
        dtype when the array is created); it is dropped so that it is filled again, else byte shuffle would be void."""
        from zarr.registry import get_codec_class

        def rebuild(c: dict[str, Any]) -> Any:
            if c.get("name") == "blosc" and c.get("configuration", {}).get("typesize") == 1:
                c = {**c, "configuration": {k: v for k, v in c["configuration"].items() if k != "typesize"}}
            try:
                return get_codec_class(c["name"]).from_dict(c)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"compressor {c!r} is not a codec this zarr knows ({e!r})") from None

        comps = tuple(rebuild(c) for c in d.get("compressors", []))
        return cls(str(d["dtype"]), tuple(int(x) for x in d["tail"]), comps)


def layout(fields: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, tail) of manifest field records: what readers depend on. Compressors are not part of it
    (each Zarr array records its own codec pipeline, so stores written with other compressor settings read the same)."""
    return {n: (str(f["dtype"]), tuple(int(x) for x in f["tail"])) for n, f in fields.items()}
