"""The `embkv` command line (click): one group, its commands in a module per concern.

``tables.py``: create, load, info, get, export, copy, check, repair, drop; ``compute.py``:
worker, queue; ``demo.py``: demo.
"""

from __future__ import annotations

from typing import Any

import click

import embkv
from embkv.cli import compute, demo, tables
from embkv.errors import EmbkvError


class _Group(click.Group):
    """Turn embkv's typed errors into a one-line message and exit status 1 instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (EmbkvError, FileNotFoundError, PermissionError) as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(embkv.__version__, prog_name="embkv")
def main() -> None:
    """embkv: an embedding store shared by every worker process on a host.

    STORE is a folder of tables: under /dev/shm it lives in memory (fast, gone at reboot),
    on a disk path it is durable and may be larger than RAM.

    \b
    Try:  embkv demo            (1M x 64 table, 4 workers, vs a dict copy per worker)
          embkv create /dev/shm/shop items --dim 64
          embkv load /dev/shm/shop items keys.npy vectors.npy
          embkv get /dev/shm/shop items 42 43
    """


for command in (*tables.COMMANDS, *compute.COMMANDS, demo.demo):
    main.add_command(command)
