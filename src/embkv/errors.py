"""Exceptions and warnings raised by embkv: one class per failure, all under :class:`EmbkvError`.

Each class subclasses the built-in exception a caller would naturally catch too
(``KeyError`` for a missing table, ``TypeError`` for a wrongly typed key, ...), so code
written against the built-ins keeps working.
"""

from __future__ import annotations

__all__ = [
    "CorruptTableError",
    "EmbkvError",
    "EmbkvWarning",
    "FormatVersionError",
    "KernelFallbackWarning",
    "KeyTypeError",
    "NotATableError",
    "ReadOnlyError",
    "ReadRetryError",
    "SchemaError",
    "StorageError",
    "StoreNotFoundError",
    "TableClosedError",
    "TableExistsError",
    "TableNotFoundError",
    "TruncatedTableError",
    "WriterLockedError",
]


class EmbkvError(Exception):
    """Base class of every error embkv raises on purpose."""


class TableNotFoundError(EmbkvError, KeyError):
    """The store has no table of that name."""

    def __str__(self) -> str:  # KeyError quotes its argument; a message reads better
        return str(self.args[0]) if self.args else "table not found"


class TableExistsError(EmbkvError, FileExistsError):
    """``create_table`` was asked for a name the store already holds."""


class SchemaError(EmbkvError, ValueError):
    """Vectors of the wrong dim, dtype or shape, or a table spec that makes no sense."""


class KeyTypeError(EmbkvError, TypeError):
    """Keys of the wrong type: strings for an int64 table, floats, nested lists, ..."""


class ReadOnlyError(EmbkvError, PermissionError):
    """A write was attempted through a store opened with ``readonly=True``."""


class WriterLockedError(EmbkvError, TimeoutError):
    """Another process held the table's writer lock for longer than ``lock_timeout``."""


class TableClosedError(EmbkvError, ValueError):
    """The table or store was closed and cannot serve calls any more."""


class NotATableError(EmbkvError, ValueError):
    """The file is not an embkv table (wrong magic): a foreign file in the store folder."""


class TruncatedTableError(EmbkvError, ValueError):
    """The file is shorter than its header says: an interrupted copy or a damaged disk."""


class FormatVersionError(EmbkvError, ValueError):
    """The file was written by a newer embkv with a format this version cannot read."""


class CorruptTableError(EmbkvError, ValueError):
    """The file's header checksum fails, or its index points outside the file."""


class ReadRetryError(EmbkvError, RuntimeError):
    """A row kept changing under a reader for the whole retry budget (a writer stuck mid-row)."""


class StalenessError(EmbkvError, RuntimeError):
    """A training table's pull would exceed its staleness bound (rows pulled, not yet pushed)."""


class StoreNotFoundError(EmbkvError, FileNotFoundError):
    """A read-only open named a store folder that does not exist."""


class StorageError(EmbkvError, OSError):
    """The file system refused a write (disk full, quota, permission, read-only mount).

    Raised before anything visible changed: the table keeps serving its previous version.
    ``errno`` is the underlying error number.
    """

    @classmethod
    def from_os_error(cls, exc: OSError, what: str) -> StorageError:
        """The typed error for the file system refusing ``what``; the previous version stays served."""
        if isinstance(exc, StorageError):
            return exc
        return cls(exc.errno or 0, f"{what}: {exc.strerror or exc}; nothing was changed, "
                   "the previous version is still served", getattr(exc, "filename", None))


class EmbkvWarning(UserWarning):
    """Base class of the warnings embkv gives (filter them with ``warnings.simplefilter``)."""


class KernelFallbackWarning(EmbkvWarning):
    """The compiled kernel could not be loaded, so embkv runs on its numpy fallback.

    Files and answers are the same; lookups are slower and writes much slower. Not given
    when the fallback was asked for with ``EMBKV_KERNEL=numpy``.
    """
