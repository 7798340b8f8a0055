"""The benchmark suite of bench.md: `python -m bench <command>` (see __main__.py), results under bench/results/."""
