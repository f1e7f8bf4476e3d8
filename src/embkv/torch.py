"""PyTorch modules backed by training tables (extra ``embkv[torch]``).

``Embedding(table)`` and ``EmbeddingBag(table, mode="sum" | "mean")`` behave like their
``torch.nn`` namesakes, but their weights live in a :class:`embkv.train.TrainingTable`:
``forward`` pulls the rows of the ids in the batch, and when ``backward()`` reaches those rows
their gradient is pushed to the table, whose optimizer updates them (a tensor hook: nothing to
call). With ``push_on_backward=False`` the gradients wait until you call ``module.step()``,
for example after ``optimizer.step()`` of the dense part, or several backward passes summed.
The dense part of the model stays on ``torch.optim`` as usual. Modules in ``eval()`` mode, or
under ``torch.no_grad()``, read rows without pinning them.

Data loading: :func:`prefetching` walks a ``DataLoader`` (its workers make the batches) one
batch ahead and hands each next batch's ids to the tables, whose background threads load them
while the model computes the current one::

    for batch in embkv.torch.prefetching(loader, {users: lambda b: b["user"], items: lambda b: b["item"]}):
        loss = model(batch)
        loss.backward()   # pushes the embedding gradients
        dense_opt.step()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from .train.table import TrainingTable

__all__ = ["Embedding", "EmbeddingBag", "prefetching"]


def _ids(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor, got {t.dtype}")
        return t.detach().to("cpu", torch.int64).reshape(-1).numpy()
    return np.asarray(t, dtype=np.int64).reshape(-1)


class _TableModule(torch.nn.Module):
    def __init__(self, table: TrainingTable, push_on_backward: bool) -> None:
        super().__init__()
        if not isinstance(table, TrainingTable):
            raise TypeError(f"expected an embkv.train.TrainingTable, got {type(table).__name__}")
        self.table = table
        self.embedding_dim = table.dim
        self.push_on_backward = push_on_backward
        self._waiting: list[tuple[np.ndarray, torch.Tensor]] = []

    def _rows(self, flat: np.ndarray) -> torch.Tensor:
        """Rows of ``flat`` ids as a leaf tensor whose gradient goes to the table."""
        if not (self.training and torch.is_grad_enabled()):
            return torch.from_numpy(self.table.weights(flat))
        rows = torch.from_numpy(self.table.pull(flat)).requires_grad_(True)
        if self.push_on_backward:
            rows.register_hook(lambda grad, ids=flat: self._push(ids, grad))  # type: ignore[no-untyped-call]
        else:
            self._waiting.append((flat, rows))
        return rows

    def _push(self, ids: np.ndarray, grad: torch.Tensor) -> None:
        self.table.push(ids, grad.detach().to("cpu", torch.float32).numpy())

    def step(self) -> None:
        """Push the gradients of every forward since the last step (``push_on_backward=False``);
        rows whose forward got no gradient are released."""
        waiting, self._waiting = self._waiting, []
        for ids, rows in waiting:
            if rows.grad is None:
                self.table.release(ids)
            else:
                self._push(ids, rows.grad)

    def prefetch(self, ids: Any) -> None:
        """Start loading the rows of ``ids`` (the next batch's) into the table's cache."""
        self.table.prefetch(_ids(ids))


class Embedding(_TableModule):
    """``torch.nn.Embedding`` whose weight is a training table: ``forward(ids)`` gives
    ``ids.shape + (dim,)`` float32 rows."""

    def __init__(self, table: TrainingTable, *, push_on_backward: bool = True) -> None:
        super().__init__(table, push_on_backward)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = _ids(ids)
        uniq, inverse = np.unique(flat, return_inverse=True)
        rows = self._rows(uniq)
        out = rows[torch.from_numpy(inverse)]
        return out.reshape(*tuple(ids.shape), self.embedding_dim)


class EmbeddingBag(_TableModule):
    """``torch.nn.EmbeddingBag`` (``mode="sum"`` or ``"mean"``) whose weight is a training table.

    ``forward(input, offsets=None, per_sample_weights=None)`` as in torch: a 2-D ``input`` is one
    bag per row; a 1-D one is cut into bags at ``offsets``.
    """

    def __init__(self, table: TrainingTable, mode: str = "mean", *, push_on_backward: bool = True) -> None:
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
        super().__init__(table, push_on_backward)
        self.mode = mode

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        flat = _ids(input)
        uniq, inverse = np.unique(flat, return_inverse=True)
        rows = self._rows(uniq)
        local = torch.from_numpy(inverse.reshape(tuple(input.shape)))
        return torch.nn.functional.embedding_bag(local, rows, offsets, mode=self.mode,
                                                 per_sample_weights=per_sample_weights)


def prefetching(batches: Iterable[Any], ids_of: dict[_TableModule, Callable[[Any], Any]]) -> Iterator[Any]:
    """Yield ``batches`` one at a time, handing each module the ids of the batch after the one yielded.

    ``ids_of`` maps each module to a function that takes a batch to that module's ids.
    """
    it = iter(batches)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        for module, get in ids_of.items():
            module.prefetch(get(following))
        yield current
        current = following
    yield current
