"""`--no-progress` for the libraries too: datasets, transformers and huggingface_hub draw their own progress bars
("Generating train split", "Loading weights", "Writing model shards") unless told not to."""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# (module, query, disable, enable); a query named "are_…_disabled" answers the other way round
_SWITCHES = (
    ("datasets", "is_progress_bar_enabled", "disable_progress_bars", "enable_progress_bars"),
    ("transformers.utils.logging", "is_progress_bar_enabled", "disable_progress_bar", "enable_progress_bar"),
    ("huggingface_hub.utils", "are_progress_bars_disabled", "disable_progress_bars", "enable_progress_bars"),
)


@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """Turn the libraries' progress bars off inside the block when `enabled` is False; restore them after."""
    restore: list[Callable[[], None]] = []
    if not enabled:
        for module, query, disable, enable in _SWITCHES:
            try:
                lib = importlib.import_module(module)
            except ImportError:
                continue
            on = getattr(lib, query)()
            if query.startswith("are_"):
                on = not on
            if on:
                getattr(lib, disable)()
                restore.append(getattr(lib, enable))
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
