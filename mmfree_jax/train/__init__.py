"""Training: optimizer and its finiteness guard (`optim`), train state and its shardings
(`state`), the one step builder with the LM loss (`steps`) and the distillation losses
(`distill`), metric writers (`metrics`), and the trainer: `run.setup` (with the checks before
compute in `checks` and `memory`), then `trainer.train`'s loop with `step_log`. Nothing outside
`train/` imports it except the CLIs, benchmarks and experiments."""
