"""Compute on miss: the cache in front of a table, the work queues of missing keys, and the workers."""
