"""The console scripts' entry points, one module per command (pyproject `[project.scripts]`).

Each module's docstring is its command's `--help` text; `run()` is the entry, `main(argv)` the
command itself (`cli.run` handles start-up, help and user errors). The work is the library's:

    metadcseg-train       train.py      -> metadcseg_jax.training.train
    metadcseg-benchmark   benchmark.py  -> metadcseg_jax.benchmark._all
    metadcseg-corrupt     corrupt.py    -> metadcseg_jax.benchmark._all.corruption_table
    metadcseg-audit       audit.py      -> metadcseg_jax.audit.report
    metadcseg-throughput  throughput.py -> metadcseg_jax.tools.throughput
    metadcseg-bench       bench.py      -> metadcseg_jax.tools.throughput

From a checkout, `python -m experiments.<script>` runs the same entry points.
"""
