"""Measurement, not product: `fervit bench` (run.py: the training pipeline beside the usual per-image one),
the inference speed bench (inference_speed.py) and the CPU step probe (cpu_step_probe.py).

The package imports nothing itself, so that `python -m fervit.benchmark.inference_speed` can set
OMP_WAIT_POLICY before torch is first imported.
"""
