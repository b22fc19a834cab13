"""The demo model's trainer: phantom frame pool, training loop, validation through the pipeline's own
selection and the challenge's metric definitions, and the bundle it writes (`sweepstream-train-demo`)."""
