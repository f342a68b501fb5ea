"""`fervit bench`: how fast fervit trains, measured beside the usual per-image pipeline in one run."""

from fervit.benchmark.run import BenchConfig, bench_config, format_table, run_benchmark

__all__ = ["BenchConfig", "bench_config", "format_table", "run_benchmark"]
