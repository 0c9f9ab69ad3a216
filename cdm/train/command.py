"""`cdm train` options (typer): a thin layer that fills a TrainConfig and calls `cdm.train.trainer.run`.

Register with ``app.command("train")(train_command)``. Under ``torchrun --nproc-per-node N -m cdm.cli train ...``
every process runs this command and the trainer joins the process group (DDP).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

_STUDENT = "Student"
_LOSS = "Loss"
_OPT = "Optimisation"
_DATA = "Data"
_RUN = "Checkpoints, evaluation, logging"


def parse_weights(spec: str | None) -> dict[str, float] | None:
    """`ce=0.5,cdm=0.5` -> {"ce": 0.5, "cdm": 0.5}."""
    if not spec:
        return None
    out = {}
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip().lower()] = float(value)
        except ValueError:
            raise ValueError(f"--weights item {item!r}: expected part=number, e.g. ce=0.5,cdm=0.5") from None
    return out


def train_command(
    store: Annotated[str, typer.Option(help="Teacher store (directory or fsspec URL) made by `cdm precompute`.", rich_help_panel=_DATA)],
    map: Annotated[str, typer.Option("--map", help="Map store made by `cdm build-map` for this store and student tokenizer.", rich_help_panel=_DATA)],
    out: Annotated[str, typer.Option(help="Output directory (local or a mounted shared file system, not a URL): checkpoints/, model/ (final student), metrics.jsonl, metrics.png.", rich_help_panel=_RUN)],
    student: Annotated[Optional[str], typer.Option(help="Student: a Hugging Face causal LM folder (or hub name).", rich_help_panel=_STUDENT)] = None,
    student_config: Annotated[Optional[str], typer.Option(help="Or initialise from scratch: a config folder or config.json ...", rich_help_panel=_STUDENT)] = None,
    student_tokenizer: Annotated[Optional[str], typer.Option(help="... with this tokenizer (folder or tokenizer.json).", rich_help_panel=_STUDENT)] = None,
    dual_store: Annotated[Optional[str], typer.Option(help="Same-tokenizer teacher store (precomputed with the student's tokenizer) for the `kl` part.", rich_help_panel=_DATA)] = None,
    loss: Annotated[str, typer.Option(help="Loss parts joined by '+': ce, cdm, kl (dual), mined, uld. E.g. ce+cdm, ce+kl+cdm.", rich_help_panel=_LOSS)] = "ce+cdm",
    kd_weight: Annotated[float, typer.Option(help="λ: CE gets 1-λ, the KD parts share λ equally (L = (1-λ)·CE + λ·KD).", rich_help_panel=_LOSS)] = 0.5,
    weights: Annotated[Optional[str], typer.Option(help="Explicit weights instead of --kd-weight, e.g. ce=0.5,kl=0.25,cdm=0.25.", rich_help_panel=_LOSS)] = None,
    temperature: Annotated[float, typer.Option(help="KD temperature τ > 0 (both sides; the KD term is scaled by τ²).", rich_help_panel=_LOSS)] = 1.0,
    student_topk: Annotated[Optional[int], typer.Option(help="Student top-k the dynamic map searches (default: the teacher's stored K; 0 = exact matches only).", rich_help_panel=_LOSS)] = None,
    theta: Annotated[Optional[float], typer.Option(help="Fuzzy threshold on normalised edit distance (default and maximum: the map store's θ).", rich_help_panel=_LOSS)] = None,
    tail_bucket: Annotated[bool, typer.Option("--tail-bucket/--no-tail-bucket", help=(
        "CDM only (default on): keep the teacher mass that maps to no column (dropped + beyond the stored top-k) as "
        "one bucket against the student's mass outside the mapped columns, so the KL keeps full-vocabulary "
        "normalisation. Without it CDM rewards piling student mass onto the few mapped columns: in "
        "benchmarks/RESULTS.md (Quality, 3 paired seeds) CE+CDM with it is -0.078 bpb vs CE and -0.027 vs MinED, "
        "without it +0.037 vs CE. --no-tail-bucket gives the paper's columns-only KL."), rich_help_panel=_LOSS)] = True,
    reverse: Annotated[bool, typer.Option("--reverse/--no-reverse", help="CDM: also map student top-k ids back to teacher candidates (direction B, roles fixed).", rich_help_panel=_LOSS)] = False,
    kl_tail: Annotated[bool, typer.Option("--kl-tail/--no-kl-tail", help="KL (dual): keep the stored tail mass as one bucket.", rich_help_panel=_LOSS)] = True,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW), > 0.", rich_help_panel=_OPT)] = 3e-4,
    min_lr_ratio: Annotated[float, typer.Option(help="Cosine schedule floor, as a fraction of --lr (0 to 1).", rich_help_panel=_OPT)] = 0.1,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps (0: none).", rich_help_panel=_OPT)] = 100,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).", rich_help_panel=_OPT)] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="Clip the global gradient norm (0: off).", rich_help_panel=_OPT)] = 1.0,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimiser steps to train for (>= 1).", rich_help_panel=_OPT)] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Or: epochs over the training sequences (> 0; fractions allowed).", rich_help_panel=_OPT)] = None,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimiser step on each process.", rich_help_panel=_OPT)] = 1,
    dtype: Annotated[str, typer.Option(help="fp32, or bf16 autocast (weights stay fp32).", rich_help_panel=_OPT)] = "fp32",
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help=(
        "Recompute each layer's activations in the backward pass instead of keeping them: less memory for long "
        "sequences or big micro-batches, about one more forward pass of time; same gradients."), rich_help_panel=_OPT)] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=_OPT)] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the data order and of a from-scratch initialisation.", rich_help_panel=_OPT)] = 0,
    batch_size: Annotated[int, typer.Option(help="Most sequences per micro-batch.", rich_help_panel=_DATA)] = 8,
    max_tokens: Annotated[Optional[int], typer.Option(help="Most padded tokens per micro-batch (length bucketing; must hold one --max-length sequence).", rich_help_panel=_DATA)] = None,
    max_length: Annotated[int, typer.Option(help="Student tokens kept per sequence (>= 2).", rich_help_panel=_DATA)] = 2048,
    kd_topk: Annotated[Optional[int], typer.Option(help="Use only the first k stored teacher candidates.", rich_help_panel=_DATA)] = None,
    block_size: Annotated[int, typer.Option(help="Contiguous sequences read together (I/O unit).", rich_help_panel=_DATA)] = 32,
    window_blocks: Annotated[int, typer.Option(help="Blocks shuffled and bucketed together.", rich_help_panel=_DATA)] = 8,
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes (0: read in the training process).", rich_help_panel=_DATA)] = 2,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: only at the end).", rich_help_panel=_RUN)] = 500,
    keep_checkpoints: Annotated[int, typer.Option(help="Complete checkpoints kept, newest first (0: keep every checkpoint).", rich_help_panel=_RUN)] = 2,
    eval_every: Annotated[int, typer.Option(help="Held-out CE and bits per byte every N steps (0: off).", rich_help_panel=_RUN)] = 500,
    eval_sequences: Annotated[int, typer.Option(help="Held-out sequences (evenly spaced teacher indices; at most 10% of the store; 0: none).", rich_help_panel=_RUN)] = 64,
    log_every: Annotated[int, typer.Option(help="Write a metrics.jsonl record every N steps.", rich_help_panel=_RUN)] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue exactly from the newest complete checkpoint in --out (same stores, by key, and the same data and loss options; nothing to do when it is already at --max-steps).", rich_help_panel=_RUN)] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.", rich_help_panel=_RUN)] = True,
) -> None:
    """Train a student on a teacher store + map store (CDM, MinED, ULD, same-tokenizer KL, CE); the teacher is never loaded."""
    from cdm.storage.ragged import StoreError
    from cdm.train.data import LoaderConfig
    from cdm.train.trainer import ConfigError, TrainConfig, TrainingDiverged, run

    try:
        cfg = TrainConfig(
            store=store, map=map, out=out, student=student, student_config=student_config,
            student_tokenizer=student_tokenizer, dual_store=dual_store, loss=loss, kd_weight=kd_weight,
            weights=parse_weights(weights), temperature=temperature, student_topk=student_topk, theta=theta,
            tail_bucket=tail_bucket, reverse=reverse, kl_tail=kl_tail, lr=lr, min_lr_ratio=min_lr_ratio,
            warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip, max_steps=max_steps,
            epochs=epochs, grad_accum=grad_accum, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
            device=device, seed=seed,
            loader=LoaderConfig(batch_size=batch_size, max_tokens=max_tokens, max_length=max_length,
                                block_size=block_size, window_blocks=window_blocks, kd_topk=kd_topk, seed=seed),
            num_workers=num_workers, save_every=save_every, keep_checkpoints=keep_checkpoints,
            eval_every=eval_every, eval_sequences=eval_sequences, log_every=log_every, resume=resume,
            progress=progress,
        )
        run(cfg)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None  # run() already said where it stopped and how to resume
    except (StoreError, ConfigError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except TrainingDiverged as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3) from None
