"""Training: optimizer (`optim`), train state and its shardings (`state`), the jitted pure
steps (`steps`), model FLOPs (`flops`), metric writers (`metrics`) and the trainer (`trainer`:
setup, then a short loop). Nothing outside `train/` imports it except the CLIs, benchmarks
and experiments."""
