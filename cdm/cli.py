"""The `cdm` command line: a thin typer layer over the Python API (cdm.precompute, cdm.mapping, cdm.train)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Cross-tokenizer knowledge distillation with CDM: precompute -> build-map -> train.",
)


@app.command("info")
def info_command(
    store: Annotated[str, typer.Argument(help="Teacher or map store directory or fsspec URL.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Summarise a teacher or map store: sequences, tokens, k, teacher, shards, bytes on disk and bytes per token."""
    from cdm.storage.ragged import StoreError
    from cdm.storage.verify import store_info

    try:
        info = store_info(store)
    except StoreError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    width = max(len(k) for k in info)
    for k, v in info.items():
        typer.echo(f"{k:<{width}}  {v}")


@app.command("verify")
def verify_command(
    store: Annotated[str, typer.Argument(help="Teacher or map store directory or fsspec URL.")],
    max_problems: Annotated[int, typer.Option(min=0, help="Stop after this many problems (0: no limit).")] = 50,
) -> None:
    """Recompute shard digests and check every sequence's invariants (teacher or map store; a map store also
    against its teacher store where that opens); exit 1 on the first problems found."""
    from cdm.storage.ragged import StoreError
    from cdm.storage.verify import verify_store

    try:
        report = verify_store(store, max_problems=max_problems)
    except (StoreError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    for n in report.notes:
        typer.echo(f"note: {n}", err=True)
    for p in report.problems:
        typer.echo(f"problem: {p}", err=True)
    if not report.ok:
        typer.echo(f"FAILED: {len(report.problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"OK: {report.shards_checked} shard(s), {report.sequences_checked} sequence(s) verified")


@app.command("build-map")
def build_map_command(
    store: Annotated[str, typer.Option("--store", help="Teacher store (path or fsspec URL).")],
    student_tokenizer: Annotated[str, typer.Option("--student-tokenizer", help="Student tokenizer: HF folder, tokenizer.json or .gguf.")],
    out: Annotated[str, typer.Option("--out", help="Map store to write (path or fsspec URL).")],
    align: Annotated[str, typer.Option("--align", help="offsets (exact, default) | dtw (CDM entropy-weighted DTW) | mined.")] = "offsets",
    theta: Annotated[float, typer.Option("--theta", help="Fuzzy neighbour threshold, in (0, 1]: token pairs with normalised "
                                                          "edit distance levenshtein/(len a + len b) below it.")] = 0.3,
    space_insensitive: Annotated[bool, typer.Option("--space-insensitive", help="Exact map ignores the leading-space flag (the paper's rule).")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Worker processes, >= 1 (default: all cores).")] = None,
    cache_dir: Annotated[Optional[str], typer.Option("--cache-dir", help="Cache for per-tokenizer-pair vocabulary maps.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Align a teacher store to a student tokenizer and write a map store (+ report.json)."""
    from cdm.mapping.build import build_map, format_report
    from cdm.storage.ragged import StoreError

    try:
        res = build_map(store, student_tokenizer, out, align=align, theta=theta, space_insensitive=space_insensitive,
                        workers=workers, cache_dir=cache_dir, progress=progress, log=lambda m: typer.echo(m, err=True))
    except (StoreError, ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: the sequences committed to the map store so far are kept; rerun the same "
                   "command to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(format_report(res.report))
    typer.echo(f"map store: {res.url}" + ("" if res.computed else " (already complete)"))


@app.command("inspect")
def inspect_command(
    map_store: Annotated[str, typer.Argument(help="Map store (path or fsspec URL).")],
    seq: Annotated[int, typer.Option("--seq", help="Sequence index.")] = 0,
    store: Annotated[Optional[str], typer.Option("--store", help="Teacher store, if it moved since build-map.")] = None,
    top: Annotated[int, typer.Option("--top", help="Teacher candidates shown per row.")] = 3,
    max_rows: Annotated[int, typer.Option("--max-rows")] = 80,
    all_positions: Annotated[bool, typer.Option("--all", help="Show prompt positions too.")] = False,
) -> None:
    """Print a side-by-side alignment of one sequence: text spans, tokens, top teacher candidates and their mapping."""
    from cdm.mapping.inspect import inspect_sequence
    from cdm.storage.ragged import StoreError

    try:
        typer.echo(inspect_sequence(map_store, seq, store_url=store, top=top, max_rows=max_rows, only_response=not all_positions))
    except (StoreError, IndexError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _register_stage_commands() -> None:
    from cdm.precompute.command import ls_command, precompute_command
    from cdm.demo import demo_command
    from cdm.train.command import train_command

    app.command("precompute")(precompute_command)
    app.command("ls")(ls_command)
    app.command("train")(train_command)
    app.command("demo")(demo_command)


_register_stage_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
