"""The example plugin (``mem-example``) and filter (``xor-example``) of trionbd's
docs/plugins.md, installed through entry points."""
