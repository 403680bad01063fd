"""``python -m trionbd``: the same as the ``trionbd`` command."""

from .cli import main

main()
