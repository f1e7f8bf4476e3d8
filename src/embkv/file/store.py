"""A store: a folder of tables, in /dev/shm (memory) or on a disk path (durable, larger than RAM)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any, cast

import numpy as np

from ..errors import (
    KeyTypeError,
    ReadOnlyError,
    SchemaError,
    StorageError,
    StoreNotFoundError,
    TableClosedError,
    TableExistsError,
    TableNotFoundError,
)
from .codec import encode_rows
from .format import DTYPES, KEY_TYPES, DTypeName, KeyType, Layout
from .inputs import as_int_keys, as_str_keys, as_tags
from .legacy import upgrade_file
from .mapping import Chunk, Progress, build_version, copy_version, heap_bytes
from .publish import TABLE_SUFFIX, check_name, is_memory_path, remove_stale_temps, temp_path
from .table import Table
from .wal import SYNC_POLICIES, SyncPolicy

__all__ = ["Store", "open_store"]

# a vector dtype: its name, or the numpy dtype / scalar type (np.float16)
DTypeArg = DTypeName | np.dtype[Any] | type[np.floating[Any]]
DEFAULT_CAPACITY = 1024
LOAD_CHUNK = 65536  # rows per kernel call when a version is built from a source
LOAD_HEADROOM = 32  # a bulk load leaves 1/32 of its rows spare
DEFAULT_LOCK_TIMEOUT = 30.0


class Store:
    """A folder of tables. Use :func:`embkv.open` to get one.

    Tables are opened lazily and cached per store object. A read-only store never writes
    anything (not even lock files) and can serve from a read-only mount.

    Example::

        store = embkv.open("/dev/shm/shop")
        items = store.create_table("items", dim=64)
        reader = embkv.open("/dev/shm/shop", readonly=True)["items"]
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT, sync: SyncPolicy = "interval",
                 sync_interval: float = 1.0) -> None:
        if sync not in SYNC_POLICIES:
            raise SchemaError(f"sync must be one of {SYNC_POLICIES}, got {sync!r}")
        self.path = os.path.abspath(os.fspath(path))
        self.readonly = readonly
        self.lock_timeout = float(lock_timeout)
        self.sync = sync
        self.sync_interval = float(sync_interval)
        self._tables: dict[str, Table] = {}
        self._closed = False
        if readonly:
            if not os.path.isdir(self.path):
                raise StoreNotFoundError(f"no embkv store at {self.path}")
        else:
            try:
                os.makedirs(self.path, exist_ok=True)
                remove_stale_temps(self.path)
            except PermissionError as exc:
                raise StorageError.from_os_error(
                    exc, f"store {self.path}: cannot write here (use readonly=True to read)") from exc

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "read-write"
        return f"<embkv.Store {self.path!r} {mode} tables={self.list_tables()}>"

    def _check_open(self) -> None:
        if self._closed:
            raise TableClosedError(f"store {self.path} is closed")

    def _table_path(self, name: str) -> str:
        return os.path.join(self.path, check_name(name) + TABLE_SUFFIX)

    def list_tables(self) -> list[str]:
        """Names of the tables in the store, sorted."""
        self._check_open()
        return sorted(
            e[: -len(TABLE_SUFFIX)] for e in os.listdir(self.path)
            if e.endswith(TABLE_SUFFIX) and not e.startswith(".")
        )

    def __contains__(self, name: object) -> bool:
        try:
            return isinstance(name, str) and os.path.exists(self._table_path(name))
        except SchemaError:  # not a valid table name, so not a table here
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.list_tables())

    def __getitem__(self, name: str) -> Table:
        """The table called ``name``; raises :class:`TableNotFoundError` if there is none."""
        self._check_open()
        table = self._tables.get(name)
        if table is not None and not table.closed:
            return table
        path = self._table_path(name)
        if not os.path.exists(path):
            raise TableNotFoundError(f"store {self.path} has no table {name!r} (has {self.list_tables()})")
        table = Table(path, name, readonly=self.readonly, lock_timeout=self.lock_timeout, sync=self.sync,
                      sync_interval=self.sync_interval)
        self._tables[name] = table
        return table

    def _require_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise ReadOnlyError(f"store {self.path} was opened read-only")

    def create_table(self, name: str, dim: int, dtype: DTypeArg = "float32", key_type: KeyType = "int64", *,
                     capacity: int = DEFAULT_CAPACITY, exist_ok: bool = False, tags: bool | None = None) -> Table:
        """Create an empty table. ``key_type``: int64 or str.

        ``dtype``: how vectors are stored: ``float32``, ``float16``, ``float64``, or ``bfloat16``
        and ``int8`` (one scale per row, error at most scale / 2 per element), which reads return
        as float32 (see :mod:`embkv.file.codec`). ``tags=True``: every row keeps a u64 tag
        (``put(..., tags=)``, ``get_tagged``, ``get_fresh``; compute on miss needs it), 8 bytes
        per row; a new table has none unless asked. ``capacity`` is only a starting size: tables
        grow as rows are added. With ``exist_ok=True`` an existing table of the same schema is
        returned instead of an error (``tags=None`` takes it as it is, tagged or not).
        """
        self._require_writable()
        dtype = _dtype_name(dtype)
        layout = Layout.plan(dim, dtype, key_type, capacity, heap_capacity=32 * max(16, capacity),
                             created_ns=time.time_ns(), tagged=bool(tags))
        path = self._table_path(name)
        if os.path.exists(path):
            if not exist_ok:
                raise TableExistsError(f"table {name!r} already exists in {self.path}: open it with "
                                       f"store[{name!r}], or pass exist_ok=True")
            table = self[name]
            want_tags = table.tagged if tags is None else tags
            if (table.dim, table.stored_dtype, table.key_type, table.tagged) != (layout.dim, dtype, key_type,
                                                                                 want_tags):
                raise SchemaError(
                    f"table {name!r} exists with dim={table.dim} dtype={table.stored_dtype} keys={table.key_type} "
                    f"tags={table.tagged}"
                )
            return table
        # build under a temporary name and link it in: a concurrent creator loses cleanly
        tmp = temp_path(path)
        try:
            build_version(tmp, layout, iter(()))
            os.link(tmp, path)
        except FileExistsError:
            raise TableExistsError(f"table {name!r} already exists in {self.path}") from None
        except OSError as exc:
            raise StorageError.from_os_error(exc, f"table {name!r}: could not create it in {self.path}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return self[name]

    def load_table(self, name: str, keys: Any, vectors: Any = None, *, dtype: DTypeArg | None = None,
                   key_column: str = "key", vector_column: str = "vector", capacity: int | None = None,
                   progress: Progress | None = None, tags: bool | None = None, row_tags: Any = None) -> Table:
        """Build a whole new version of a table in one pass and publish it atomically.

        Sources: ``keys`` and ``vectors`` as arrays (or lists); paths to ``.npy`` files (memory-mapped,
        so larger-than-RAM sources stream); or a Parquet path / ``pyarrow.Table`` in ``keys`` with
        ``key_column`` and ``vector_column`` (a fixed-size or plain list column), ``vectors`` left None.
        The table is created if missing (dim, dtype and key type from the data); an existing table
        keeps its schema and the data must match its dim and key type. Readers switch to the new
        version on their next call; the old version's memory is freed when the last reader lets go.
        Duplicate keys: the last occurrence wins. ``progress(n)`` is called after each chunk of rows.
        ``tags=True`` makes a new table's rows keep a tag word; ``row_tags`` (one u64 per row, or
        one for all) fills it, e.g. from ``table.export_tagged()`` (a tagged table only).
        """
        self._require_writable()
        keys, vectors = _read_source(keys, vectors, key_column, vector_column)
        n = len(vectors)
        if vectors.ndim != 2:
            raise SchemaError(f"vectors must be 2-D [rows, dim], got shape {vectors.shape}")
        if len(keys) != n:
            raise SchemaError(f"{len(keys)} keys but {n} vectors")
        if vectors.dtype.kind not in "fiu" or vectors.dtype == np.bool_:
            raise SchemaError(f"vectors must be numeric, got dtype {vectors.dtype}")
        key_type = _infer_key_type(keys)
        existing = None
        if name in self:
            existing = self[name]
        if existing is not None:
            if existing.dim != vectors.shape[1] or existing.key_type != key_type:
                raise SchemaError(
                    f"table {name!r} has dim={existing.dim} keys={existing.key_type}; the data has "
                    f"dim={vectors.shape[1]} keys={key_type}. Drop the table to change its schema."
                )
            dtype_name = existing.stored_dtype if dtype is None else _dtype_name(dtype)
            if dtype_name != existing.stored_dtype:
                raise SchemaError(f"table {name!r} stores {existing.stored_dtype}, not {dtype_name}; "
                                  "drop the table (embkv drop) to store another dtype")
            if tags is not None and tags != existing.tagged:
                raise SchemaError(f"table {name!r} has tags={existing.tagged}; drop it to change that")
        else:
            dtype_name = _dtype_name(dtype if dtype is not None else _default_dtype(vectors.dtype))
        if row_tags is not None and not (existing.tagged if existing is not None else tags):
            raise SchemaError(f"row_tags need a tagged table: load {name!r} with tags=True")
        tag_words = None if row_tags is None else as_tags(row_tags, n)
        chunks, heap_needed = _chunks(keys, vectors, key_type, dtype_name, tag_words)
        # sized to the data: a little headroom for the updates that follow (each takes a fresh row
        # before it frees the old one), not a doubling that the memory would pay for
        cap = max(capacity or 0, n + n // LOAD_HEADROOM, DEFAULT_CAPACITY)
        tagged = existing.tagged if existing is not None else bool(tags)
        layout = Layout.plan(vectors.shape[1], dtype_name, key_type, cap,
                             heap_capacity=heap_needed + heap_needed // LOAD_HEADROOM + 32 * (cap - n),
                             created_ns=time.time_ns(), tagged=tagged)
        if existing is None:
            existing = self.create_table(name, vectors.shape[1], dtype_name, key_type, capacity=16,
                                         exist_ok=True, tags=tagged)
        with existing.write_session() as session:
            session.publish(layout, chunks, progress)
        return existing

    def copy_table(self, name: str, dest: Store | str | os.PathLike[str], dest_name: str | None = None) -> Table:
        """Copy a table into another store (or under another name): snapshot and restore.

        ``/dev/shm`` to a disk path is a durable snapshot; the other way restores it. Readers
        of either side keep reading throughout; writers to the source wait while its file is
        copied (a sequential copy at memory or disk speed). The destination version is
        published atomically like ``load_table``: its open readers switch on their next call.
        """
        self._require_writable()
        target = dest if isinstance(dest, Store) else Store(dest, lock_timeout=self.lock_timeout, sync=self.sync,
                                                             sync_interval=self.sync_interval)
        target._require_writable()
        dest_name = check_name(dest_name or name)
        dest_path = target._table_path(dest_name)
        source = self[name]
        if os.path.realpath(dest_path) == os.path.realpath(source.path):
            raise SchemaError("a table cannot be copied onto itself")
        tmp = temp_path(dest_path)
        try:
            with source.write_session() as session:
                copy_version(session.mapping, tmp, durable=not is_memory_path(dest_path))
            if dest_name in target:
                existing = target[dest_name]
                with existing.write_session() as session:
                    session.install(tmp)
                return existing
            os.link(tmp, dest_path)
        except FileExistsError:
            raise TableExistsError(f"table {dest_name!r} appeared in {target.path} during the copy") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return target[dest_name]

    def upgrade_table(self, name: str) -> bool:
        """Rewrite a table written by embkv 0.2 (format 2 or 3) in the current format; True if it did.

        This embkv does not open old files as tables (their error says to run this). The rows
        are copied into a new version that is published atomically, like ``load_table``:
        every key keeps its vector and tag, and embkv 0.2 readers still mapping the old file
        let it go on their next call. A table already in the current format is left alone.
        """
        self._require_writable()
        path = self._table_path(name)
        if not os.path.exists(path):
            raise TableNotFoundError(f"no table {name!r} in {self.path}")
        try:
            return upgrade_file(path, name, self.lock_timeout, LOAD_HEADROOM)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise StorageError.from_os_error(exc, f"table {name!r}: could not write the upgraded version") from exc

    def drop_table(self, name: str) -> None:
        """Delete a table. Readers that still hold it get TableNotFoundError on their next call."""
        self._require_writable()
        table = self[name]
        with table.write_session() as session:
            session.drop()
        table.close()
        self._tables.pop(name, None)

    def close(self) -> None:
        """Close every table opened through this store."""
        for table in self._tables.values():
            table.close()
        self._tables.clear()
        self._closed = True

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(path: str | os.PathLike[str], readonly: bool = False,
               lock_timeout: float = DEFAULT_LOCK_TIMEOUT, sync: SyncPolicy = "interval",
               sync_interval: float = 1.0) -> Store:
    """Open (and create, unless ``readonly``) the store at ``path``. Exposed as :func:`embkv.open`.

    ``/dev/shm/...`` keeps tables in shared memory (fast, lost at reboot); a disk path keeps
    them durable and may exceed RAM (pages come from the page cache).
    ``lock_timeout``: seconds a writer waits for another process's write to finish.
    ``sync`` (disk stores): when the write-ahead log is fsynced: ``"always"`` before each
    ``put``/``delete`` returns, ``"interval"`` every ``sync_interval`` seconds (the default,
    like Redis's ``appendfsync everysec``), or ``"never"``. A killed process loses no
    acknowledged write under any policy; the policy matters for power loss and OS crashes.
    """
    return Store(path, readonly=readonly, lock_timeout=lock_timeout, sync=sync, sync_interval=sync_interval)


# -------------------------------------------------------------------- load helpers


def _dtype_name(dtype: Any) -> DTypeName:
    if isinstance(dtype, str) and dtype == "bfloat16":  # no numpy dtype of that name
        return "bfloat16"
    try:
        name = np.dtype(dtype).name
    except TypeError:
        raise SchemaError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES)}") from None
    if name not in DTYPES:
        raise SchemaError(f"dtype must be one of {sorted(DTYPES)}, got {name}")
    return cast(DTypeName, name)


def _default_dtype(dt: np.dtype[Any]) -> DTypeName:
    """What a new table stores when the caller did not say: the data's float type, else float32.

    Integer data (int8 included) is stored as float32: quantized storage is chosen by name.
    """
    return _dtype_name(dt) if dt.kind == "f" and dt.name in DTYPES else "float32"


def _read_source(keys: Any, vectors: Any, key_column: str, vector_column: str) -> tuple[Any, np.ndarray]:
    if vectors is None:
        return _read_arrow(keys, key_column, vector_column)
    if isinstance(keys, (str, os.PathLike)):
        keys = np.load(os.fspath(keys), mmap_mode="r", allow_pickle=False)
    if isinstance(vectors, (str, os.PathLike)):
        vectors = np.load(os.fspath(vectors), mmap_mode="r", allow_pickle=False)
    vecs = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors)
    return keys, vecs


def _read_arrow(source: Any, key_column: str, vector_column: str) -> tuple[Any, np.ndarray]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SchemaError("loading Parquet/Arrow needs pyarrow: pip install 'embkv[arrow]'") from None
    table = pq.read_table(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(table, pa.Table):
        raise SchemaError("load_table(name, source) needs a Parquet path or a pyarrow.Table "
                          "(or pass keys and vectors)")
    for col in (key_column, vector_column):
        if col not in table.column_names:
            raise SchemaError(f"column {col!r} not in {table.column_names}")
    key_col = table.column(key_column).combine_chunks()
    vec_col = table.column(vector_column).combine_chunks()
    if pa.types.is_integer(key_col.type):
        keys: Any = key_col.to_numpy()
    elif pa.types.is_string(key_col.type) or pa.types.is_large_string(key_col.type) or pa.types.is_binary(
            key_col.type):
        keys = key_col.to_pylist()
    else:
        raise KeyTypeError(f"key column {key_column!r} has type {key_col.type}; need integers or strings")
    if pa.types.is_fixed_size_list(vec_col.type):
        dim = vec_col.type.list_size
    elif pa.types.is_list(vec_col.type) or pa.types.is_large_list(vec_col.type):
        lengths = np.asarray(vec_col.value_lengths())
        if len(lengths) and (lengths != lengths[0]).any():
            raise SchemaError(f"vector column {vector_column!r} holds lists of different lengths")
        dim = int(lengths[0]) if len(lengths) else 0
    else:
        raise SchemaError(f"vector column {vector_column!r} must be a list column, got {vec_col.type}")
    if vec_col.null_count:
        raise SchemaError(f"vector column {vector_column!r} has null rows")
    flat = vec_col.flatten().to_numpy(zero_copy_only=False)
    return keys, flat.reshape(len(vec_col), dim)


def _infer_key_type(keys: Any) -> KeyType:
    if isinstance(keys, np.ndarray):
        if keys.dtype.kind in "iu":
            return "int64"
        if keys.dtype.kind in "USO":
            return "str"
        raise KeyTypeError(f"keys must be integers or strings, got dtype {keys.dtype}")
    if len(keys) == 0:
        return "int64"
    first = keys[0]
    if isinstance(first, (str, bytes)):
        return "str"
    if isinstance(first, (int, np.integer)) and not isinstance(first, bool):
        return "int64"
    raise KeyTypeError(f"keys must be integers or strings, got {type(first).__name__}")


Chunks = Iterator[Chunk]


def _last_of_each(keys: list[Any]) -> np.ndarray:
    """Positions of the last occurrence of each distinct key, in input order."""
    last = {k: i for i, k in enumerate(keys)}
    return np.fromiter(sorted(last.values()), dtype=np.int64, count=len(last))


def _chunks(keys: Any, vectors: np.ndarray, key_type: str, dtype: str,
            tags: np.ndarray | None = None) -> tuple[Chunks, int]:
    """Validate and pack keys up front (so bad input changes nothing), then stream vector chunks."""
    n = len(vectors)
    assert key_type in KEY_TYPES
    if key_type == "int64":
        packed_int = as_int_keys(keys)
        keep = _last_of_each(packed_int.tolist()) if len(np.unique(packed_int)) != n else None
        if keep is not None:  # duplicates: the last wins, and a fresh version never holds a key twice
            packed_int, vectors, n = packed_int[keep], vectors[keep], len(keep)
            tags = None if tags is None else tags[keep]

        def gen_int() -> Iterator[Chunk]:
            for lo in range(0, n, LOAD_CHUNK):
                hi = min(n, lo + LOAD_CHUNK)
                yield packed_int[lo:hi], encode_rows(vectors[lo:hi], dtype), None if tags is None else tags[lo:hi]

        return gen_int(), 0
    if isinstance(keys, np.ndarray):
        keys = keys.tolist()
    packed = [as_str_keys(keys[lo : lo + LOAD_CHUNK]) for lo in range(0, n, LOAD_CHUNK)]
    hashes = np.concatenate([np.frombuffer(p[0], dtype=np.uint64) for p in packed]) if packed else np.zeros(0)
    if len(np.unique(hashes)) != n:  # maybe duplicates: the last wins (str and bytes of one key are one key)
        key_bytes = [p[2][o[i] : o[i + 1]] for p in packed
                     for o in [np.frombuffer(p[1], dtype=np.uint64).tolist()] for i in range(len(o) - 1)]
        keep = _last_of_each(key_bytes)
        keys, vectors, n = [keys[i] for i in keep.tolist()], vectors[keep], len(keep)
        tags = None if tags is None else tags[keep]
        packed = [as_str_keys(keys[lo : lo + LOAD_CHUNK]) for lo in range(0, n, LOAD_CHUNK)]
    heap = sum(heap_bytes(p) for p in packed)

    def gen_str() -> Iterator[Chunk]:
        for i, lo in enumerate(range(0, n, LOAD_CHUNK)):
            yield (packed[i], encode_rows(vectors[lo : lo + LOAD_CHUNK], dtype),
                   None if tags is None else tags[lo : lo + LOAD_CHUNK])

    return gen_str(), heap
