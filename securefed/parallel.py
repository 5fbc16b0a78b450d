"""Threads and chunk sizes for work on model-sized vectors.

Model-sized vectors are processed in chunks of :func:`get_chunk_size` elements, so the
working set of one step (a chunk of input, of rounding uniforms, of keystream, of
packed output) stays in a core's L2 cache and no full-length temporary is made.
A vector is split into at most :func:`get_threads` contiguous *slabs* of whole chunks,
one per thread: the calls inside a slab (AES-CTR in ``cryptography``, the compiled
encoding and packing loops, numpy arithmetic) release the GIL, so slabs run on
separate cores. Every result is a function of positions only (keystreams start at
the slab's offset), so it does not depend on the thread count or the chunk size.

A slab is only split off when it carries enough work to pay for a thread
(:data:`MIN_SLAB_WORK` element-passes); small vectors stay on the calling thread.

``threads`` defaults to the environment variable ``SECUREFED_THREADS`` or the CPUs
this process may run on; set both process-wide with :func:`configure` or for a
block with :func:`options`. See ``protocols/base.md`` ("Streaming and threads").
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

__all__ = ["ALIGN", "MIN_SLAB_WORK", "configure", "get_chunk_size", "get_threads", "options", "run_slabs", "slabs"]

T = TypeVar("T")

#: Chunk and slab boundaries fall on multiples of 64 elements: a packed chunk then starts on a
#: 64-bit word boundary at any width, and a keystream offset on an AES block boundary.
ALIGN = 64
#: Elements per chunk: 32 Ki elements (128 KiB of uint32) keeps one step's buffers in L2.
DEFAULT_CHUNK = 1 << 15
#: Least work (elements x passes over them, e.g. x mask streams) worth a thread of its own.
MIN_SLAB_WORK = 1 << 20


def _env_threads() -> int:
    raw = os.environ.get("SECUREFED_THREADS", "")
    if raw.strip():
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value >= 1:
            return value
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_defaults = {"threads": _env_threads(), "chunk_size": DEFAULT_CHUNK}
_local: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("securefed_parallel", default=None)


def _check(threads: int | None, chunk: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < ALIGN
                              or chunk % ALIGN):
        raise ValueError(f"chunk_size must be a positive multiple of {ALIGN} elements, got {chunk!r}")


def get_threads() -> int:
    """Threads a vector operation may use (1: the calling thread only)."""
    local = _local.get()
    return local["threads"] if local else _defaults["threads"]


def get_chunk_size() -> int:
    """Elements per chunk (a multiple of :data:`ALIGN`)."""
    local = _local.get()
    return local["chunk_size"] if local else _defaults["chunk_size"]


def configure(*, threads: int | None = None, chunk_size: int | None = None) -> None:
    """Set the process-wide thread count and/or chunk size; ValueError for invalid values."""
    _check(threads, chunk_size)
    if threads is not None:
        _defaults["threads"] = threads
    if chunk_size is not None:
        _defaults["chunk_size"] = chunk_size


@contextlib.contextmanager
def options(*, threads: int | None = None, chunk_size: int | None = None) -> Iterator[None]:
    """Use these settings inside the ``with`` block (this thread and context only)."""
    _check(threads, chunk_size)
    current = {"threads": get_threads(), "chunk_size": get_chunk_size()}
    if threads is not None:
        current["threads"] = threads
    if chunk_size is not None:
        current["chunk_size"] = chunk_size
    token = _local.set(current)
    try:
        yield
    finally:
        _local.reset(token)


def slabs(size: int, work_per_element: int = 1, align: int = ALIGN) -> list[tuple[int, int]]:
    """Split ``range(size)`` into contiguous ``(lo, hi)`` slabs, one per thread that pays for itself.

    Boundaries are multiples of `align` (a multiple of :data:`ALIGN`); each slab but one
    carries at least :data:`MIN_SLAB_WORK` units of work (``work_per_element`` per element).
    """
    if size <= 0:
        return []
    want = min(get_threads(), max(1, size * max(1, work_per_element) // MIN_SLAB_WORK))
    blocks = -(-size // align)
    want = max(1, min(want, blocks))
    bounds = [min(size, (blocks * i // want) * align) for i in range(want + 1)]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


_PREFIX = "securefed-slab"
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _executor(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=_PREFIX)
            _pool_size = workers
        return _pool


def _forget_pool() -> None:  # a forked child has the pool object but not its threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def run_slabs(fn: Callable[[int, int], T], ranges: Sequence[tuple[int, int]]) -> list[T]:
    """``[fn(lo, hi) for (lo, hi) in ranges]``, the first on the calling thread, the others on the pool.

    Waits for all of them; if any raised, re-raises the exception of the lowest slab.
    """
    if len(ranges) <= 1 or threading.current_thread().name.startswith(_PREFIX):
        # (a slab that itself splits work runs it inline: waiting on the pool from the pool could deadlock)
        return [fn(lo, hi) for lo, hi in ranges]
    pool = _executor(len(ranges) - 1)
    # Each task runs in a copy of the caller's context, so options() set by the caller apply there too.
    futures = [pool.submit(contextvars.copy_context().run, fn, lo, hi) for lo, hi in ranges[1:]]
    results: list[T] = []
    errors: list[BaseException] = []
    try:
        results.append(fn(*ranges[0]))
    except BaseException as e:  # noqa: BLE001 - re-raised below, after the other slabs finished
        errors.append(e)
    for f in futures:
        try:
            results.append(f.result())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    if errors:
        raise errors[0]
    return results
