"""The console scripts' entry points, one module per command (pyproject `[project.scripts]`).

Each module's docstring is its command's `--help` text; `run()` is the entry, `main(argv)` the
command itself (`cli.run` handles start-up, help and user errors). Commands are the top layer:
they may import every room. The work is the library's:

    metadcseg-train       train.py      -> metadcseg_jax.training.train
    metadcseg-predict     predict.py    -> metadcseg_jax.inference.predict
    metadcseg-export      export.py     -> metadcseg_jax.inference.export (a run without model/:
                                           metadcseg_jax.training.export)
    metadcseg-evaluate    evaluate.py   -> metadcseg_jax.inference.evaluate_folder
    metadcseg-benchmark   benchmark.py  -> metadcseg_jax.benchmark (runner, tables, report)
    metadcseg-corrupt     corrupt.py    -> metadcseg_jax.benchmark.corruption
    metadcseg-audit       audit.py      -> metadcseg_jax.audit.report
    metadcseg-speed       speed.py      -> metadcseg_jax.tools.throughput, tools.torch_ref
    metadcseg-bench       bench.py      -> metadcseg-speed (the old name, one more release)
    metadcseg-throughput  throughput.py -> metadcseg-speed (the old name, one more release)

From a checkout, `python -m experiments.<script>` runs the same entry points.
"""
