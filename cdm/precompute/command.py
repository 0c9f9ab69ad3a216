"""typer-annotated entry points that the CLI registers as `cdm precompute` and `cdm ls`."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer


def precompute_command(
    teacher: Annotated[str, typer.Option("--teacher", help="Teacher: HF model folder, .gguf file, or hub name.")],
    data: Annotated[list[str], typer.Option("--data", help="Input file(s) (jsonl/json/parquet/csv/arrow), a "
                                            "save_to_disk folder, or a hub dataset. Repeat for several files.")],
    out: Annotated[Optional[str], typer.Option("--out", help="Store path or fsspec URL (default: content-addressed "
                                               "under --cache-dir).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Teacher log-probs kept per token.")] = 128,
    backend: Annotated[str, typer.Option("--backend", help="hf (transformers) or vllm.")] = "hf",
    text_field: Annotated[Optional[str], typer.Option("--text-field", help="Field with plain text (all trained).")] = None,
    prompt_field: Annotated[Optional[str], typer.Option("--prompt-field", help="Prompt field (not trained).")] = None,
    response_field: Annotated[Optional[str], typer.Option("--response-field", help="Response field (trained).")] = None,
    messages_field: Annotated[Optional[str], typer.Option("--messages-field", help="Chat messages field "
                                                          "[{role, content}], rendered with the chat template.")] = None,
    separator: Annotated[str, typer.Option("--separator", help="Text between prompt and response.")] = "",
    chat_template: Annotated[Optional[str], typer.Option("--chat-template", help="Jinja chat template file "
                                                         "(default: the tokenizer's).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="Tokenizer folder overriding the teacher's.")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Max tokens per sequence "
                                                      "(default: the teacher's context).")] = None,
    truncation: Annotated[str, typer.Option("--truncation", help="Longer sequences: truncate (flagged) or skip.")] = "truncate",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use only the first N input rows.")] = None,
    split: Annotated[str, typer.Option("--split", help="Dataset split (hub datasets, saved DatasetDicts).")] = "train",
    num_shards: Annotated[Optional[int], typer.Option("--num-shards", help="Data-parallel workers (default: torchrun's "
                                                      "$WORLD_SIZE or the SLURM array's task count, else 1).")] = None,
    shard_index: Annotated[Optional[int], typer.Option("--shard-index", help="This worker, 0-based (default: $RANK or the "
                                                       "SLURM array task's position, else 0).")] = None,
    cache_dir: Annotated[Optional[str], typer.Option("--cache-dir", help="Store cache (default $CDM_CACHE_DIR or $CDM_CACHE, "
                                                     "else $XDG_CACHE_HOME/cdm, else ~/.cache/cdm).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16.")] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", help="Padded tokens per forward batch.")] = 8192,
    memory_budget_mb: Annotated[Optional[int], typer.Option("--memory-budget-mb", help="Rows of the top-k step "
                                                            "are chunked so that an fp32 rows x vocab tensor fits "
                                                            "this many MiB (default 1024 on GPU, 256 on CPU).")] = None,
    codec: Annotated[str, typer.Option("--codec", help="Top-k storage codec: lossless (fp16-exact), quant, qN "
                                        "(bounded log-prob error), plain. See benchmarks/RESULTS.md.")] = "lossless",
    id_table: Annotated[int, typer.Option("--id-table", help="Remap the N most frequent token ids (fitted on the "
                                          "first rows) to small codes: ~8-11% smaller ids. 0 = off.")] = 0,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", help="vllm backend: GPUs per "
                                                      "engine (tensor parallelism) for big teachers.")] = 1,
    writer: Annotated[str, typer.Option("--writer", help="Where the store is encoded and written: thread, process "
                                        "(a child process: no GIL shared with the device loop, but a pipe "
                                        "transfer), auto (= thread; see benchmarks/RESULTS.md).")] = "auto",
    commit_tokens: Annotated[int, typer.Option("--commit-tokens", help="Make the shard durable every N tokens: what a "
                                               "killed worker keeps (not part of the store's key).")] = 65536,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (instead of the store "
                                          "path).")] = False,
) -> None:
    """Run the teacher once over the data and write its top-k signal into a sharded, resumable teacher store."""
    from cdm.precompute.data import DataError
    from cdm.precompute.encode import OffsetsUnavailable
    from cdm.precompute.run import run
    from cdm.precompute.teacher import TeacherError
    from cdm.storage import StoreError

    try:
        res = run(teacher, data, out, top_k=top_k, backend=backend, text_field=text_field, prompt_field=prompt_field,
                  response_field=response_field, messages_field=messages_field, separator=separator,
                  chat_template=chat_template, tokenizer=tokenizer, max_length=max_length, truncation=truncation,
                  limit=limit, split=split, num_shards=num_shards, shard_index=shard_index, cache_dir=cache_dir,
                  dtype=dtype, device=device, batch_tokens=batch_tokens, memory_budget_mb=memory_budget_mb,
                  codec=codec, id_table=id_table, writer_mode=writer, commit_tokens=commit_tokens, progress=progress, echo=lambda s: typer.echo(s, err=True),
                  backend_options={"tensor_parallel_size": tensor_parallel_size} if tensor_parallel_size > 1 else None)
    except (DataError, TeacherError, OffsetsUnavailable, StoreError, ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: every sequence handed to the store writer is committed; rerun the same command "
                   "to resume", err=True)
        raise typer.Exit(130) from None
    if as_json:  # stdout holds only the JSON, so that it pipes into jq
        typer.echo(json.dumps({"url": res.url, "key": res.key, "computed": res.computed,
                               "store_complete": res.store_complete, "stats": res.stats, "wall_s": res.wall_s}))
    else:
        typer.echo(res.url)


def ls_command(
    cache_dir: Annotated[Optional[str], typer.Option("--cache-dir", help="Store cache (default $CDM_CACHE_DIR or $CDM_CACHE, "
                                                     "else $XDG_CACHE_HOME/cdm, else ~/.cache/cdm).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """List cached teacher stores with their size and provenance."""
    from dataclasses import asdict

    from cdm.precompute.cache import format_stores, list_stores

    stores = list_stores(cache_dir)
    typer.echo(json.dumps([asdict(s) for s in stores], indent=1) if as_json else format_stores(stores))
