"""Running independent chunks of work on a few threads without oversubscribing the cores.

Private helper. NumPy releases the GIL in its copy/arithmetic loops and in BLAS calls, so chunks of
batched linear algebra run in parallel on plain threads. BLAS would however start its own threads
inside every call as well: measured on a 2-core machine, 448 stacked ``(200, 100)ᵀ(200, 100)``
products took 0.38 s with OpenBLAS's default threading and 0.064 s with one BLAS thread (small
matrices gain nothing from BLAS threads and lose a lot when the cores are busy). So while our
chunks run, BLAS is held to one thread per call through ``threadpoolctl`` when it is installed
(also when they run serially: the same measurement with one worker took 13-22 s for the whole PaDiM
case against about 2 s with two workers and one BLAS thread each); without ``threadpoolctl`` the
chunks run serially and BLAS keeps its own threading.

The limit is process-wide for the duration of the call (this is how BLAS exposes it): other
threads of the caller that use BLAS at the same moment also get one BLAS thread meanwhile. Calls
overlapping from several caller threads share one limit, released by the last of them.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ._validation import check_workers

__all__ = [
    "available_cores",
    "blas_controller",
    "resolve_workers",
    "run_chunks",
    "shared_executor",
    "single_threaded_blas",
]

T = TypeVar("T")

#: Upper bound on the default number of worker threads.
MAX_DEFAULT_WORKERS: int = 8


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not every platform has affinity masks
        return os.cpu_count() or 1


def resolve_workers(workers: Any) -> int:
    """Return the number of worker threads to use: ``None`` means the usable cores (at most 8).

    The one worker policy of the library (every estimator's ``workers`` argument comes through here).
    Without ``threadpoolctl`` :func:`run_chunks` still runs chunks serially, whatever this returns.

    Examples
    --------
    >>> resolve_workers(3)
    3
    >>> resolve_workers(0)
    Traceback (most recent call last):
    ...
    ValueError: workers must be a positive integer or None, got 0
    """
    count = check_workers(workers)
    if count is None:
        return max(1, min(available_cores(), MAX_DEFAULT_WORKERS))
    return count


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def shared_executor(workers: int) -> ThreadPoolExecutor:
    """The process-wide pool, with at least ``workers`` threads, kept between calls.

    Starting threads costs about a millisecond each on these machines, as much as a whole small
    evaluation. Tasks given to it never wait on other tasks, so callers in several threads can share it.
    """
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            old = _pool
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="anomstats")
            _pool_size = workers
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pool object but not its threads.
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


_controller: Any = None
_controller_lock = threading.Lock()
_limit_lock = threading.Lock()
_limit_users = 0
_saved_threads: list[tuple[Any, int]] = []


def blas_controller() -> Any:
    """A cached ``threadpoolctl.ThreadpoolController`` for BLAS, or ``None`` without threadpoolctl.

    Built once (scanning the loaded libraries takes ~0.4 ms) and shared by every caller.
    """
    global _controller
    with _controller_lock:
        if _controller is None:
            try:
                from threadpoolctl import ThreadpoolController

                _controller = ThreadpoolController().select(user_api="blas")
            except Exception:  # missing, or unable to inspect this platform's libraries
                _controller = False
    return _controller or None


def _release_openblas_ownership() -> None:
    # threadpoolctl (3.6+) lets only one "controlling" Python thread change OpenBLAS's process-wide
    # limit and silently ignores the others. Our limit is shared by caller threads, and the last one
    # out (which restores) is often not the first one in (which set it): without this, that restore
    # was ignored and BLAS stayed single-threaded (seen about once in 150 overlapping bursts).
    try:
        from threadpoolctl import OpenBLASController

        OpenBLASController.clear_controlling_thread(force=True)
    except (ImportError, AttributeError):  # older threadpoolctl: no ownership rule to work around
        pass


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Hold BLAS to one thread while any caller is inside; the last one out restores it.

    Reference-counted across threads, so that overlapping calls cannot restore the thread count in
    the wrong order (which could leave BLAS single-threaded for good). A no-op without threadpoolctl.
    """
    global _limit_users, _saved_threads
    controller = blas_controller()
    if controller is None:
        yield
        return
    with _limit_lock:
        if _limit_users == 0:
            _release_openblas_ownership()
            _saved_threads = [(lib, lib.num_threads) for lib in controller.lib_controllers]
            for lib, _ in _saved_threads:
                lib.set_num_threads(1)
            _release_openblas_ownership()
        _limit_users += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                _release_openblas_ownership()
                for lib, threads in _saved_threads:
                    lib.set_num_threads(threads)
                _release_openblas_ownership()
                _saved_threads = []


def run_chunks(
    task: Callable[[T], None], chunks: Iterable[T], workers: int, *, single_blas: bool = True
) -> None:
    """Call ``task(chunk)`` for every chunk, on up to ``workers`` threads.

    The tasks must be independent (e.g. write disjoint slices of an output). The first exception
    raised by a task is re-raised here. With ``single_blas`` (for many small products) BLAS is held
    to one thread meanwhile, also when the chunks run serially; pass ``False`` when a single large
    product would profit from BLAS's own threads.

    Examples
    --------
    >>> seen = []
    >>> run_chunks(seen.append, range(4), workers=2)
    >>> sorted(seen)
    [0, 1, 2, 3]
    """
    chunks = list(chunks)
    workers = min(workers, len(chunks))
    limit = single_threaded_blas() if single_blas and blas_controller() is not None else None
    if limit is None:
        # Without threadpoolctl our threads would multiply BLAS's own: stay serial.
        workers = 1 if single_blas else workers
        limit = contextlib.nullcontext()
    with limit:
        if workers <= 1:
            for chunk in chunks:
                task(chunk)
            return
        _run_on_pool(task, chunks, workers)


def _run_on_pool(task: Callable[[T], None], chunks: list[T], workers: int) -> None:
    """``task`` over ``chunks`` with exactly ``workers`` chunks in flight on the shared pool.

    The pool may have more threads (another caller asked for more); the memory budgets of the callers
    are divided by *their* ``workers``, so each call runs ``workers`` runner tasks that take the chunks
    one by one. After a failure the runners stop taking chunks; the exception of the earliest failed chunk
    is re-raised. Chunks are taken in order, so every chunk before a failed one was already taken and runs
    to its end: the error raised does not depend on the threads' timing (the same patch is named as by a
    serial run).
    """
    pending = enumerate(chunks)
    lock = threading.Lock()
    failed = threading.Event()
    errors: list[tuple[int, BaseException]] = []

    def runner() -> None:
        while not failed.is_set():
            with lock:
                index, chunk = next(pending, (-1, _NO_CHUNK))
            if chunk is _NO_CHUNK:
                return
            try:
                task(chunk)  # type: ignore[arg-type]
            except BaseException as error:  # noqa: BLE001 - re-raised below, the earliest chunk's first
                with lock:
                    errors.append((index, error))
                failed.set()
                return

    pool = shared_executor(workers)
    futures = [pool.submit(runner) for _ in range(workers)]
    for future in futures:
        future.result()  # waits for every runner (they never raise: errors are collected)
    if errors:
        raise min(errors, key=lambda item: item[0])[1]


_NO_CHUNK = object()
