"""The method's mathematics: exact meta-gradients (`meta`), the DCD boundary weights (`dcd`),
the total objective (`objective`), per-pixel losses (`losses`), the optimizers (`optim`), the
Gaussian 2-Wasserstein distance (`wasserstein`, DALE), the backbones (`models/`) and the edge
detectors (`edges/`). Pure functions of arrays; nothing here reads files or configs."""
