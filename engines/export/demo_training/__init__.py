"""The trainers of the FetalCLIP family: the demo model from scratch on phantoms (`sweepstream-train-demo`:
phantom frame pool, training loop, validation through the pipeline's own selection and the challenge's metric
definitions, the bundle it writes) and the heads of a pretrained backbone on ACOUSLIC-format cases
(`sweepstream-train-heads`: finetune.py, cases.py), sharing frame preparation, sampling, losses, the
optimizer step and schedule, and metrics."""
