"""The benchmark suite: `python -m bench <command>` (see __main__.py), results under bench/results/."""
