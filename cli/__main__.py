"""``python -m cli``: the same command as ``nko-ops`` (for subprocesses that have no entry script)."""

from cli.root import main

main()
