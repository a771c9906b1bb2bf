"""``python -m bench [--config small|micro|tiny] [--repeats N] [--cases ...]``: see bench/run.py."""

from bench.run import main

main()
