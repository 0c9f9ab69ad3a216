"""`--no-progress` for the libraries too: datasets, transformers and huggingface_hub draw their own progress bars
("Generating train split", "Loading weights", "Writing model shards") unless told not to."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """Turn the libraries' progress bars off inside the block when `enabled` is False; restore them after."""
    if enabled:
        yield
        return
    restore: list[Callable[[], None]] = []
    try:
        import datasets

        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            restore.append(datasets.enable_progress_bars)
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            restore.append(hf_logging.enable_progress_bar)
    except ImportError:
        pass
    try:
        import huggingface_hub.utils as hub_utils

        if not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()
            restore.append(hub_utils.enable_progress_bars)
    except ImportError:
        pass
    try:
        yield
    finally:
        for undo in restore:
            undo()


def quiet_libraries_unless_progress(fn: F) -> F:
    """Decorator for entry points with a keyword `progress`: with progress=False, the libraries stay quiet too."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with library_progress_bars(bool(kwargs.get("progress", True))):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
