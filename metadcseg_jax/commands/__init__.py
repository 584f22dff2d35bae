"""The console scripts' entry points, one module per command (pyproject `[project.scripts]`).

Each module's docstring is its command's `--help` text; `run()` is the entry, `main(argv)` the
command itself (`cli.run` handles start-up, help and user errors). The work is the library's:

    metadcseg-train       train.py      -> metadcseg_jax.train
    metadcseg-benchmark   benchmark.py  -> metadcseg_jax.benchmark
    metadcseg-corrupt     corrupt.py    -> metadcseg_jax.benchmark.corruption_table
    metadcseg-audit       audit.py      -> metadcseg_jax.audit_report
    metadcseg-throughput  throughput.py -> metadcseg_jax.throughput
    metadcseg-bench       bench.py      -> metadcseg_jax.throughput

From a checkout, `python -m experiments.<script>` runs the same entry points.
"""
