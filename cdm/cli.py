"""The `cdm` command line: a thin typer layer over the Python API (cdm.precompute, cdm.mapping, cdm.train)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Cross-tokenizer knowledge distillation with CDM: precompute -> build-map -> train.",
)


@app.command("info")
def info_command(
    store: Annotated[str, typer.Argument(help="Teacher store directory or fsspec URL.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Summarise a teacher store: sequences, tokens, k, teacher, shards, bytes on disk and bytes per token."""
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
    store: Annotated[str, typer.Argument(help="Teacher store directory or fsspec URL.")],
    max_problems: Annotated[int, typer.Option(help="Stop after this many problems.")] = 50,
) -> None:
    """Recompute shard digests and check every sequence's invariants; exit 1 on the first problems found."""
    from cdm.storage.verify import verify_store

    report = verify_store(store, max_problems=max_problems)
    for p in report.problems:
        typer.echo(f"problem: {p}", err=True)
    if not report.ok:
        typer.echo(f"FAILED: {len(report.problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"OK: {report.shards_checked} shard(s), {report.sequences_checked} sequence(s) verified")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
