"""Input records -> canonical text + trained character spans; dataset loading through `datasets`.

Three record shapes: a text field, a prompt + response field pair, or a chat `messages` field rendered with a
chat template. Bad rows raise `SkipRecord(reason)` (counted, reported); bad inputs as a whole raise `DataError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cdm.errors import CdmError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(CdmError, ValueError):
    """The input data as a whole cannot be used (unreadable file, absent column, wrong flags)."""


class SkipRecord(Exception):
    """One input row cannot be used; `reason` is a short, low-cardinality label counted in the report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RecordFormat:
    """Which fields make the canonical text: exactly one of text / prompt+response / messages."""

    text_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    messages_field: str | None = None
    separator: str = ""

    def __post_init__(self) -> None:
        shapes = [self.text_field is not None, self.prompt_field is not None or self.response_field is not None,
                  self.messages_field is not None]
        if sum(shapes) != 1:
            raise DataError("give exactly one record shape: --text-field, --prompt-field + --response-field, or --messages-field")
        if (self.prompt_field is None) != (self.response_field is None):
            raise DataError("--prompt-field and --response-field go together")

    @property
    def kind(self) -> str:
        return "text" if self.text_field else "chat" if self.messages_field else "prompt_response"

    @property
    def fields(self) -> list[str]:
        return [f for f in (self.text_field, self.prompt_field, self.response_field, self.messages_field) if f]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: v for k, v in asdict(self).items() if v is not None}}


@dataclass
class Canonical:
    """The exact string the teacher tokenises and its trained character spans (int32 [R, 2])."""

    text: str
    response_spans: np.ndarray


ChatRenderer = Callable[[list[dict[str, Any]], bool], str]  # (messages, add_generation_prompt) -> text


def _string(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if value is None:
        raise SkipRecord(f"missing field {name!r}")
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise SkipRecord(f"non-UTF-8 bytes in field {name!r}") from None
    if not isinstance(value, str):
        raise SkipRecord(f"field {name!r} is {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SkipRecord(f"non-UTF-8 text (lone surrogate) in field {name!r}") from None
    return value


def normalise_messages(value: Any) -> list[dict[str, Any]]:
    """Validate chat messages ([{role, content}], or ShareGPT [{from, value}]) and return role/content dicts."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise SkipRecord("malformed messages: not a list") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise SkipRecord("malformed messages: not a non-empty list")
    out = []
    for m in value:
        if not isinstance(m, Mapping):
            raise SkipRecord("malformed messages: an entry is not an object")
        if "role" in m:
            role, content = m.get("role"), m.get("content")
        elif "from" in m:
            role, content = SHAREGPT_ROLES.get(str(m.get("from"))), m.get("value")
        else:
            raise SkipRecord("malformed messages: an entry has no role")
        if not isinstance(role, str) or not role:
            raise SkipRecord("malformed messages: an entry has no role")
        if not isinstance(content, str):
            raise SkipRecord("malformed messages: content is not a string")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise SkipRecord("non-UTF-8 text (lone surrogate) in messages") from None
        out.append({"role": role, "content": content})
    return out


def _render(render: ChatRenderer, messages: list[dict[str, Any]], gen: bool) -> str:
    try:
        return render(messages, gen)
    except Exception as e:  # jinja templates raise arbitrary errors (e.g. "roles must alternate")
        raise SkipRecord(f"chat template failed: {type(e).__name__}") from e


SENTINEL = "\x00cdm\x01sentinel\x00"


def _diff_span(a: str, b: str) -> tuple[int, int]:
    """[start, end) of the region of `a` that differs from `b` (common prefix and suffix removed)."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    q = 0
    while q < min(len(a), len(b)) - p and a[-1 - q] == b[-1 - q]:
        q += 1
    return p, len(a) - q


def render_chat(messages: list[dict[str, Any]], render: ChatRenderer) -> Canonical:
    """Render a conversation and locate every assistant turn.

    Span of assistant turn i = [len(render(msgs[:i], generation prompt)), len(render(msgs[:i+1]).rstrip())):
    the content plus the end-of-turn marker. Templates that rewrite earlier turns (e.g. strip reasoning) break
    that prefix property; then the span is where the full render changes when the content is replaced by a
    sentinel (the content as rendered, without the marker).
    """
    full = _render(render, messages, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m["content"].strip():
            continue
        try:
            before: str | None = _render(render, messages[:i], True)
        except SkipRecord:
            before = None
        upto = _render(render, messages[: i + 1], False)
        end = len(upto.rstrip())
        if before is not None and full.startswith(upto) and upto.startswith(before) and cursor <= len(before) < end:
            start = len(before)
        else:
            alt = _render(render, [*messages[:i], {**m, "content": SENTINEL}, *messages[i + 1 :]], False)
            start, end = _diff_span(full, alt)
            if not cursor <= start < end:
                raise SkipRecord("chat template does not render assistant turns separably")
        spans.append((start, end))
        cursor = end
    if not spans:
        raise SkipRecord("no assistant turn")
    return Canonical(full, np.asarray(spans, dtype=np.int32).reshape(-1, 2))


def canonical_text(record: Mapping[str, Any], fmt: RecordFormat, render: ChatRenderer | None = None) -> Canonical:
    """Build the canonical text and trained spans of one record, or raise SkipRecord."""
    if fmt.text_field:
        text = _string(record, fmt.text_field)
        if not text.strip():
            raise SkipRecord("empty text")
        return Canonical(text, np.asarray([[0, len(text)]], dtype=np.int32))
    if fmt.prompt_field and fmt.response_field:
        prompt = _string(record, fmt.prompt_field)
        response = _string(record, fmt.response_field)
        if not response.strip():
            raise SkipRecord("empty response")
        head = prompt + fmt.separator
        text = head + response
        return Canonical(text, np.asarray([[len(head), len(text)]], dtype=np.int32))
    assert fmt.messages_field is not None and render is not None, "chat records need a chat renderer"
    if record.get(fmt.messages_field) is None:
        raise SkipRecord(f"missing field {fmt.messages_field!r}")
    out = render_chat(normalise_messages(record[fmt.messages_field]), render)
    if not out.text.strip():
        raise SkipRecord("empty text")
    return out


# ----------------------------------------------------------------------------------------------- files


def _files_of(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if not f.startswith("."))
    return [path]


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(paths: Sequence[str], split: str = "train") -> str:
    """sha256 over the content of every local input file (hub names: the name itself), plus the split."""
    h = hashlib.sha256(f"split={split}\n".encode())
    for p in paths:
        if os.path.exists(p):
            for f in _files_of(p):
                h.update(f"{os.path.relpath(f, p) if os.path.isdir(p) else os.path.basename(f)}:{_sha256_file(f)}\n".encode())
        else:
            h.update(f"hub:{p}\n".encode())
    return h.hexdigest()


def seq_id(fingerprint: str, source_index: int) -> str:
    """Stable id of a source row: sha256(data fingerprint : index)[:16]."""
    return hashlib.sha256(f"{fingerprint}:{source_index}".encode()).hexdigest()[:16]


def _first_bad_utf8(path: str) -> tuple[int, int] | None:
    """(line number, byte offset) of the first invalid UTF-8 byte in a text file, or None."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return lineno, e.start
    return None


def load_records(paths: Sequence[str], *, split: str = "train", cache_dir: str | None = None) -> Any:
    """Open local jsonl/json/parquet/csv/arrow files, a `save_to_disk` folder, or a hub dataset as a Dataset."""
    import datasets

    if not paths:
        raise DataError("no --data given")
    local = [os.path.exists(p) for p in paths]
    if not any(local):
        if len(paths) != 1:
            raise DataError(f"data paths not found: {list(paths)}")
        try:
            return datasets.load_dataset(paths[0], split=split, cache_dir=cache_dir)
        except Exception as e:
            raise DataError(f"{paths[0]!r} is neither a local file/folder nor a loadable hub dataset: {e}") from e
    if not all(local):
        raise DataError(f"data paths not found: {[p for p, ok in zip(paths, local) if not ok]}")
    if len(paths) == 1 and os.path.isdir(paths[0]):
        if any(os.path.exists(os.path.join(paths[0], f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(paths[0])
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{paths[0]}: no split {split!r} (has {list(ds)})")
                ds = ds[split]
            return ds
        raise DataError(f"{paths[0]} is a folder but not a datasets.save_to_disk folder; pass its data files")
    exts = {os.path.splitext(p)[1].lower() for p in paths}
    builders = {BUILDERS.get(e) for e in exts}
    if None in builders or len(builders) != 1:
        raise DataError(f"data files must share one of the extensions {sorted(BUILDERS)}; got {sorted(exts)}")
    builder = builders.pop()
    if builder in ("json", "csv"):  # pyarrow may load invalid UTF-8 and fail only when a row is read
        for p in paths:
            bad = _first_bad_utf8(p)
            if bad:
                raise DataError(f"{p}: line {bad[0]} holds bytes that are not UTF-8 (byte {bad[1]} of the line); "
                                "fix or re-encode the file")
    verbosity = datasets.logging.get_verbosity()
    if builder == "json":  # its own "Failed to load JSON ... in row N" line is replaced by the DataError below
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=list(paths), split="train", cache_dir=cache_dir)
    except Exception as e:
        if builder == "json":  # pyarrow names neither the file nor the line (and counts rows from 0)
            for p in paths:
                problem = _first_json_problem(p)
                if problem:
                    raise DataError(f"{p}: {problem}") from e
        cause = e.__cause__ or e
        raise DataError(f"could not read {list(paths)} as {builder}: {type(cause).__name__}: {cause}") from e
    finally:
        datasets.logging.set_verbosity(verbosity)


def _first_json_problem(path: str) -> str | None:
    """Why a .json/.jsonl file cannot be read as records, with a 1-based line number: it is empty, or the first line
    that is not a JSON object (JSON Lines), or the JSON document's own error. None if nothing is found."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        return "the file is empty (no records)"
    try:
        doc = json.loads(text)  # one JSON document: a list of records (or a dict of columns)
        return None if isinstance(doc, (list, dict)) else f"holds a JSON {type(doc).__name__}, not records"
    except json.JSONDecodeError:
        pass
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {lineno} is not valid JSON ({e.msg} at column {e.colno})"
        if not isinstance(record, dict):
            return f"line {lineno} is a JSON {type(record).__name__}, not an object (one record per line)"
    return None


def fetch_rows(dataset: Any, indices: Sequence[int]) -> tuple[list[dict[str, Any] | None], list[str | None]]:
    """Rows at `indices` as dicts; a row whose strings are not valid UTF-8 (possible in Parquet/Arrow) is None
    with a skip reason instead of failing the whole window."""
    try:
        cols = dataset[list(indices)]
        names = list(cols)
        return [{n: cols[n][j] for n in names} for j in range(len(indices))], [None] * len(indices)
    except UnicodeDecodeError:
        rows: list[dict[str, Any] | None] = []
        reasons: list[str | None] = []
        for i in indices:
            try:
                rows.append(dict(dataset[int(i)]))
                reasons.append(None)
            except UnicodeDecodeError:
                rows.append(None)
                reasons.append("non-UTF-8 bytes in a field")
        return rows, reasons


def check_columns(dataset: Any, fmt: RecordFormat) -> None:
    """Refuse a dataset without the columns the record format needs, naming what is there."""
    names = list(dataset.column_names)
    missing = [f for f in fmt.fields if f not in names]
    if missing:
        raise DataError(f"field(s) {missing} not in the data; its columns are {names}")
