"""What every demo shares: its optional dependencies, its run settings, its plotting helpers.

* :func:`import_dependencies`: matplotlib's ``Figure`` class and tqdm (the ``demo`` extra),
  or ``None`` after a message naming the missing package and the install command.
* :func:`progress_bars`, :func:`no_progress`: the progress wrappers the training loops take.
* :func:`isolated_cpu_run`: one thread and a forked global RNG for the duration of a demo.
* :func:`output_dir`, :func:`check_positive_int`, :func:`print_total_time`.
* :func:`run_demo`: the frame of a demo's ``run`` (checks, dependencies, output directory,
  total time) around its body.
* :func:`to_numpy`: a tensor as a numpy array for matplotlib.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

INSTALL_HINT = "install them with: pip install 'probloss[demo]'"

# progress(iterable, desc=..., leave=...): an iterable with tqdm's set_postfix
Progress = Callable[..., Any]


def import_dependencies(demo: str, *, extra: tuple[str, ...] = ()) -> tuple[type, Any] | None:
    """``(Figure, tqdm)``, or ``None`` after printing which package is missing to stderr.

    ``Figure`` is ``matplotlib.figure.Figure``: figures drawn on it and saved with
    ``savefig`` use the Agg canvas without pyplot, so no global backend is switched and no
    window or figure is left open. ``extra`` names further modules the demo needs (the VAE
    demo: ``sklearn.datasets``), imported here so that a missing one is reported before
    anything runs.

    Args:
        demo: the demo's name, as in ``probloss demo NAME``, for the message.
        extra: module names to import as well.
    """
    try:
        for name in extra:
            importlib.import_module(name)
        from matplotlib.figure import Figure
        from tqdm.auto import tqdm
    except ImportError as error:
        needs = ", ".join(["matplotlib", "tqdm", *(_package(name) for name in extra)])
        print(f"probloss demo {demo} needs {needs} ({error}); {INSTALL_HINT}", file=sys.stderr)
        return None
    return Figure, tqdm


def _package(module: str) -> str:
    """The pip name of a module's distribution (``sklearn.datasets`` -> ``scikit-learn``)."""
    top = module.split(".")[0]
    return {"sklearn": "scikit-learn"}.get(top, top)


def progress_bars(tqdm) -> Progress:
    """``tqdm`` with the demos' settings: off when stderr is not a terminal, 2 updates/s."""

    def progress(iterable: Iterable, **kwargs):
        return tqdm(iterable, disable=None, mininterval=0.5, **kwargs)

    return progress


class _Silent:
    """An iterable with tqdm's ``set_postfix``, doing nothing: training without a bar."""

    def __init__(self, iterable: Iterable) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def set_postfix(self, *args, **kwargs) -> None:
        return None


def no_progress(iterable: Iterable, **kwargs) -> _Silent:
    """The :data:`Progress` wrapper that draws nothing (``kwargs`` are tqdm's, ignored)."""
    return _Silent(iterable)


@contextlib.contextmanager
def isolated_cpu_run() -> Iterator[None]:
    """One torch thread and a forked global RNG; the caller's settings come back on exit.

    The demos' tensors are small (a few thousand rows): extra threads only add
    synchronisation, and on a busy two-core machine (CI) two threads stall each other.
    Forking the RNG leaves the caller's global random state as it was, whatever the demo
    seeds and draws.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)


def output_dir(out: str | Path) -> Path:
    """``out`` as a ``Path``, created with its parents if missing."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_positive_int(name: str, value: int | None) -> None:
    """``None`` or an int ``>= 1``; else TypeError (not an int) or ValueError (below 1).

    Example:
        >>> check_positive_int("epochs", 0)
        Traceback (most recent call last):
        ...
        ValueError: epochs must be a positive int, got 0
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")


def print_total_time(start: float) -> None:
    """The last line of every demo: wall time since ``start`` (``time.perf_counter()``)."""
    print(f"total time {time.perf_counter() - start:.1f} s")


def run_demo(
    demo: str,
    out: str | Path,
    body: Callable[[type, Progress, Path], int],
    *,
    epochs: int | None = None,
    extra: tuple[str, ...] = (),
) -> int:
    """What every demo's ``run`` does around its work; returns an exit status.

    Checks ``epochs`` (:func:`check_positive_int`), imports the dependencies
    (:func:`import_dependencies` with ``extra``: exit status 2 if one is missing), creates
    ``out`` (:func:`output_dir`), then runs ``body(Figure, progress, out)`` (``progress``
    from :func:`progress_bars`), prints the total time and returns ``body``'s status.

    Raises:
        TypeError, ValueError: ``epochs`` is not a positive int.
    """
    check_positive_int("epochs", epochs)
    deps = import_dependencies(demo, extra=extra)
    if deps is None:
        return 2
    figure_cls, tqdm = deps
    path = output_dir(out)
    start = time.perf_counter()
    status = body(figure_cls, progress_bars(tqdm), path)
    print_total_time(start)
    return status


def to_numpy(t: Tensor):
    """A tensor as a numpy array for matplotlib (detached, on the CPU)."""
    return t.detach().cpu().numpy()
