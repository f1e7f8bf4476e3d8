"""Training tables: embedding tables trained in place, larger than memory, served from the same files.

Example::

    import embkv
    from embkv.train import TrainingTable, Adagrad

    store = embkv.open("/data/rec")
    users = TrainingTable(store, "users", dim=64, optimizer=Adagrad(lr=0.05), cache_bytes=256 << 20)
    rows = users.pull(ids, next_ids=ids_of_next_batch)
    users.push(ids, grads)
    users.checkpoint()
    users.publish(embkv.open("/dev/shm/serve"), "users")

See :class:`TrainingTable` for staleness, admission and eviction, and checkpoint.py for what a
checkpoint guarantees.
"""

from .optimizers import SGD, Adagrad, Adam, Optimizer, sum_duplicates
from .table import TrainingTable

__all__ = ["SGD", "Adagrad", "Adam", "Optimizer", "TrainingTable", "sum_duplicates"]
