"""Run numpy's matrix products single-threaded while preprocessing.

The resize is a few hundred small matrix products. A multi-threaded OpenBLAS splits each of them
over all cores and spin-waits between them; with several data workers per host (or any other
load) the cores are oversubscribed and one image took 270 ms instead of 14 ms in our measurements.
Preprocessing parallelises over worker processes instead, so inside it BLAS should use one thread.

`single_threaded()` sets that for the calling thread (OpenBLAS >= 0.3.27's
`openblas_set_num_threads_local`) or, with older OpenBLAS, process-wide for the duration of the
block. Without an OpenBLAS in the process (MKL, Accelerate) it does nothing; set
OPENBLAS_NUM_THREADS / OMP_NUM_THREADS=1 in the workers instead.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import threading

import numpy as np  # noqa: F401  (loads numpy's BLAS before we look for it)

_lock = threading.Lock()
_depth = 0
_saved = 0


@functools.lru_cache(maxsize=1)
def _openblas():
    """(set_local, get, set) ctypes functions of the OpenBLAS numpy uses; missing ones are None."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "openblas" in path.lower() and ".so" in path and path not in paths:
                    paths.append(path)
    except OSError:
        return None, None, None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                local = getattr(lib, "openblas_set_num_threads_local", None)
                for fn in (get, set_, local):
                    if fn is not None:
                        fn.restype = ctypes.c_int if fn is not set_ else None
                return local, get, set_
    return None, None, None


@contextlib.contextmanager
def single_threaded():
    global _depth, _saved
    local, get, set_ = _openblas()
    if local is not None:
        previous = local(1)
        try:
            yield
        finally:
            local(previous)
        return
    if get is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = get()
            set_(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                set_(_saved)
