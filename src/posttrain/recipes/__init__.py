"""One file per method; each exposes `train(cfg)` that reads like the algorithm."""
