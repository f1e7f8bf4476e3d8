"""Row-wise optimizers that run inside a training table, exactly as PyTorch defines them.

Each optimizer updates the rows of one push in float32 with the same operations, in the same
order, as PyTorch's sparse path (``torch.optim.SGD``, ``torch.optim.Adagrad`` and
``torch.optim.SparseAdam`` on a coalesced sparse gradient), including its fused multiply-add
where PyTorch adds a sparse tensor with ``alpha``. SGD matches PyTorch bit for bit; Adagrad and
Adam match to within a few float32 ulps, because PyTorch's vectorized CPU ``sqrt`` is not always
correctly rounded and numpy's is (``tests/train/test_optimizers.py`` checks both). The state of
a row sits beside its weights in the same stored row: ``state_dim`` float32 values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np

from ..errors import SchemaError

__all__ = ["SGD", "Adagrad", "Adam", "Optimizer", "optimizer_from_config", "sum_duplicates"]

F32 = np.float32


def _fused_add(out: np.ndarray, alpha: float, values: np.ndarray) -> None:
    """``out += alpha * values`` rounded once, as PyTorch adds a sparse tensor with ``alpha``
    (a fused multiply-add): the product of two float32 is exact in float64, and the sum is
    rounded to float32 from there."""
    a = np.float64(F32(alpha))
    out[...] = (out.astype(np.float64) + a * values.astype(np.float64)).astype(F32)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """What every optimizer offers a training table. ``state_dim(dim)`` floats of state per row."""

    name: ClassVar[str] = ""

    def state_dim(self, dim: int) -> int:
        raise NotImplementedError

    def initial_state(self, n: int, dim: int) -> np.ndarray:
        """The state of ``n`` new rows."""
        return np.zeros((n, self.state_dim(dim)), dtype=F32)

    def update(self, weights: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int) -> None:
        """Apply one step in place to ``weights`` [n, dim] and ``state`` [n, state_dim] of distinct
        rows, from their summed ``grads`` [n, dim]; ``step`` counts the table's pushes, this one included."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """What a table records to refuse reopening with another optimizer."""
        return {"name": self.name, **dataclasses.asdict(self)}

    def _check(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            values = value if isinstance(value, tuple) else (value,)
            if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
                raise SchemaError(f"{type(self).__name__}: {field.name} must be finite and >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SGD(Optimizer):
    """``w -= lr * g`` (``torch.optim.SGD`` without momentum on a sparse gradient). No state."""

    name: ClassVar[str] = "sgd"
    lr: float = 0.01

    def __post_init__(self) -> None:
        self._check()

    def state_dim(self, dim: int) -> int:
        return 0

    def update(self, weights: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int) -> None:
        _fused_add(weights, -self.lr, grads)


@dataclasses.dataclass(frozen=True)
class Adagrad(Optimizer):
    """``state += g*g; w -= lr * g / (sqrt(state) + eps)``, per element (``torch.optim.Adagrad``).

    The state (the accumulator, one float per weight) starts at ``initial_accumulator_value``.
    """

    name: ClassVar[str] = "adagrad"
    lr: float = 0.01
    eps: float = 1e-10
    initial_accumulator_value: float = 0.0

    def __post_init__(self) -> None:
        self._check()

    def state_dim(self, dim: int) -> int:
        return dim

    def initial_state(self, n: int, dim: int) -> np.ndarray:
        return np.full((n, dim), self.initial_accumulator_value, dtype=F32)

    def update(self, weights: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int) -> None:
        state += grads * grads
        std = np.sqrt(state) + F32(self.eps)
        _fused_add(weights, -self.lr, grads / std)


@dataclasses.dataclass(frozen=True)
class Adam(Optimizer):
    """Adam as ``torch.optim.SparseAdam`` does it: the two moments per element, updated only for
    the rows in a push, and bias correction by the table's step count (pushes so far, one
    per ``push`` call, as SparseAdam counts ``step()`` calls per parameter), not per row.
    The state is ``[exp_avg | exp_avg_sq]``, ``2 * dim`` floats; the step count is the table's."""

    name: ClassVar[str] = "adam"
    lr: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        self._check()
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SchemaError(f"Adam: betas must be two numbers in [0, 1), got {self.betas!r}")

    def state_dim(self, dim: int) -> int:
        return 2 * dim

    def update(self, weights: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int) -> None:
        beta1, beta2 = self.betas
        dim = weights.shape[1]
        exp_avg, exp_avg_sq = state[:, :dim], state[:, dim:]
        old_avg = exp_avg.copy()
        avg_update = (grads - old_avg) * F32(1 - beta1)
        exp_avg += avg_update
        old_sq = exp_avg_sq.copy()
        sq_update = (grads * grads - old_sq) * F32(1 - beta2)
        exp_avg_sq += sq_update
        numer = avg_update + old_avg
        denom = np.sqrt(sq_update + old_sq) + F32(self.eps)
        step_size = self.lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        weights += F32(-step_size) * (numer / denom)


_BY_NAME: dict[str, type[Optimizer]] = {"sgd": SGD, "adagrad": Adagrad, "adam": Adam}


def optimizer_from_config(config: dict[str, Any]) -> Optimizer:
    """The optimizer a table recorded (``Optimizer.config``)."""
    fields = dict(config)
    cls = _BY_NAME[fields.pop("name")]
    if "betas" in fields:
        fields["betas"] = tuple(fields["betas"])
    return cls(**fields)


def sum_duplicates(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids (sorted) and each one's gradients summed in float32, in the order they came:
    what a push applies, as a coalesced sparse gradient would be."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    summed = np.add.reduceat(grads[order], starts, axis=0) if len(ids) else grads[:0]
    return sorted_ids[starts], summed.astype(np.float32, copy=False)
