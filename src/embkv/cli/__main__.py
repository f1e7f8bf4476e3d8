"""``python -m embkv.cli``: the same as the ``embkv`` command."""

from embkv.cli import main

main()
