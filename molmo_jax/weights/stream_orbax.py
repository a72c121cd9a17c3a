"""Writing an orbax parameter checkpoint piece by piece, and reading one back slice by slice.

orbax saves whole arrays, but a converted 72B model has stacked leaves of tens of GB
([80, 8192, 29568] and the like). So the converter gives orbax `StreamedLeaf` placeholders; the
`StreamingHandler` registered for them (an orbax TypeHandler, used only for these saves) opens
exactly the tensorstore array orbax would open for a numpy leaf (same spec, same tree metadata:
the result restores with plain orbax) and fills it one layer slice at a time, each slice in blocks
of whole chunks. Chunks never straddle two layers (`shard_axes=(0,)`) and hold at most 64 MB, so
every write covers whole chunks (nothing is read back) and little is buffered.
With a mesh, `write_shape` (one device's shard) bounds the chunks too, so every device of a pod
restores its part without reading anyone else's.

`ParamReader` does the reverse for export: one leaf or one layer slice at a time, via tensorstore.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import threading
from typing import Callable

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.futures import future
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import type_handler_registry, type_handlers

from molmo_jax.weights.errors import WeightsError
from molmo_jax.weights.orbax_io import stored_params
from molmo_jax.weights.params import nested

CHUNK_BYTES = 64 << 20  # largest stored chunk, and bytes per write / per commit


@dataclasses.dataclass(eq=False)
class Group:
    """Leaves produced together. `produce(i)` returns {path: array} for layer slice i of stacked
    leaves (`n_layers` slices); for unstacked leaves (`n_layers` None) `produce(None)` gives them whole."""
    produce: Callable[[int | None], dict]
    n_layers: int | None = None


@dataclasses.dataclass(eq=False)
class StreamedLeaf:
    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    group: Group
    write_shape: tuple[int, ...] | None = None  # one device's shard with --mesh; whole array otherwise

    # what orbax asks of a leaf before handing it to the handler
    @property
    def size(self):
        return int(np.prod(self.shape))

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def nbytes(self):
        return self.size * np.dtype(self.dtype).itemsize


class StreamingHandler(type_handlers.NumpyHandler):
    """Writes StreamedLeaf values group by group, slice by slice; typestr stays 'np.ndarray'."""

    def __init__(self, on_written: Callable[[tuple, int], None] | None = None):
        super().__init__()
        self.on_written = on_written
        self.error: BaseException | None = None  # re-raised by write_params as it was raised here
        self.cancelled = False  # set by write_params when the caller is interrupted (Ctrl-C)

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        return [future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos, args),
                                                             name="molmo_jax_streamed")]

    async def _open(self, leaf: StreamedLeaf, info, arg):
        await info.await_path_creation()
        spec = ts_utils.build_array_write_spec(
            info=info, arg=arg, global_shape=leaf.shape, local_shape=leaf.write_shape or leaf.shape,
            dtype=np.dtype(leaf.dtype), use_ocdbt=info.is_ocdbt_checkpoint,
            process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint))
        return await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)

    async def _write_all(self, values, infos, args):
        try:
            stores = [await self._open(leaf, info, arg) for leaf, info, arg in zip(values, infos, args)]
            self._txn, self._pending = ts.Transaction(), 0
            for group in dict.fromkeys(leaf.group for leaf in values):
                members = [(leaf, store) for leaf, store in zip(values, stores) if leaf.group is group]
                for i in range(group.n_layers) if group.n_layers is not None else (None,):
                    arrays = group.produce(i)
                    for leaf, store in members:
                        await self._write_one(leaf, store, arrays, i)
            await self._txn.commit_async()
        except BaseException as e:
            self.error = e
            raise

    async def _write_one(self, leaf, store, arrays, i):
        where = ".".join(leaf.path) + ("" if i is None else f"[{i}]")
        if leaf.path not in arrays:
            raise WeightsError(f"internal: no value produced for {where}")
        a = np.asarray(arrays[leaf.path])
        want = leaf.shape if i is None else leaf.shape[1:]
        if tuple(a.shape) != tuple(want):
            raise WeightsError(f"{where}: got shape {tuple(a.shape)}, the checkpoint needs {tuple(want)}")
        a = a.astype(leaf.dtype, copy=False)
        view = store if i is None else store[i]
        # Write in row blocks of whole chunks (chunks are at most CHUNK_BYTES): tensorstore's copy
        # and the compressed output then stay small even for a multi-GB embedding. Each commit costs
        # ~10 ms, so small writes share a transaction; it holds a copy of what it has not committed.
        rows = _rows_per_write(a, view.chunk_layout.write_chunk.shape)
        for start in range(0, a.shape[0], rows):
            if self.cancelled:
                raise KeyboardInterrupt("conversion cancelled")
            stop = min(start + rows, a.shape[0])  # (slicing past an implicit bound would extend it)
            piece = a[start:stop]
            await view.with_transaction(self._txn)[start:stop].write(piece)
            self._pending += piece.nbytes
            if self._pending >= CHUNK_BYTES:
                await self._txn.commit_async()
                self._txn, self._pending = ts.Transaction(), 0
        if self.on_written:
            self.on_written(leaf.path, a.nbytes)


def _rows_per_write(a: np.ndarray, chunk_shape) -> int:
    """Rows of `a` per write: a multiple of the chunk's rows, about CHUNK_BYTES in all."""
    chunk_rows = max(int(chunk_shape[0]), 1)
    row_bytes = max(a.nbytes // max(a.shape[0], 1), 1)
    return max(chunk_rows, CHUNK_BYTES // row_bytes // chunk_rows * chunk_rows)


def write_params(params_dir, leaves: list[StreamedLeaf], on_written=None) -> None:
    """Save `leaves` as an orbax PyTree checkpoint at `params_dir` (which must not exist)."""
    handler = StreamingHandler(on_written)
    registry = type_handler_registry.create_type_handler_registry((StreamedLeaf, handler))
    tree = nested({leaf.path: leaf for leaf in leaves})
    save_args = nested({leaf.path: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES,
                                                 shard_axes=(0,) if leaf.group.n_layers is not None else ())
                        for leaf in leaves})
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    failure, finished = [], threading.Event()

    def save():
        try:
            checkpointer.save(pathlib.Path(params_dir), args=ocp.args.PyTreeSave(tree, save_args=save_args))
        except BaseException as e:
            failure.append(e)
        finally:
            finished.set()

    # orbax waits for its writer thread from the calling thread; a Ctrl-C landing in that wait would
    # leave the writer running unseen (CPython < 3.13 then marks a joined thread stopped, gh-90882).
    # So orbax waits in a thread of ours and this thread waits on an Event: on Ctrl-C the writer is
    # told to stop at its next block, and we wait until it has, before the caller cleans up.
    with _quiet_orbax_failures():
        threading.Thread(target=save, name="molmo_jax-write-params", daemon=True).start()
        try:
            finished.wait()
        except BaseException:
            handler.cancelled = True
            finished.wait()
            raise
    if failure:  # orbax may wrap what the producer raised: give the original
        raise (handler.error or failure[0]) from None


class _DropThreadFailures(logging.Filter):
    def filter(self, record):
        return "_SignalingThread.run() raised an exception" not in record.getMessage()


@contextlib.contextmanager
def _quiet_orbax_failures():
    """orbax logs a traceback for an exception in its writer threads before handing it on; we raise
    that exception ourselves (as one clear error), so the logged copy is dropped."""
    log, drop = logging.getLogger("absl"), _DropThreadFailures()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


class ParamReader:
    """Leaves of an orbax params checkpoint, read with tensorstore one leaf or one slice at a time."""

    def __init__(self, params_dir):
        self.dir = pathlib.Path(params_dir).absolute()
        self.leaves = stored_params(self.dir)  # {path: (shape, dtype)}
        meta = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).metadata(self.dir).item_metadata
        self.driver = "zarr3" if getattr(meta, "use_zarr3", False) else "zarr"
        self.ocdbt = (self.dir / "manifest.ocdbt").exists()
        self._stores: dict = {}

    def _store(self, path):
        if path not in self._stores:
            name = ".".join(path)
            kvstore = ({"driver": "ocdbt", "base": f"file://{self.dir}/", "path": name} if self.ocdbt
                       else {"driver": "file", "path": f"{self.dir / name}/"})
            try:
                self._stores[path] = ts.open({"driver": self.driver, "kvstore": kvstore}, open=True,
                                             read=True).result()
            except Exception as e:
                raise WeightsError(f"{self.dir}: cannot open parameter {name} ({e})") from None
        return self._stores[path]

    def read(self, path, index: int | None = None) -> np.ndarray:
        store = self._store(path)
        try:
            return np.asarray((store if index is None else store[index]).read().result())
        except Exception as e:
            where = ".".join(path) + ("" if index is None else f"[{index}]")
            raise WeightsError(f"{self.dir}: cannot read parameter {where} ({e})") from None
