"""Measurement, apart from the runtime: `eval` (every policy live beside the baselines), the benchmarks (`bench
engine`, `bench throughput`, `bench soak`, `bench overhead`), their figures, and the plain llama.cpp reader they
compare against. Nothing in the runtime imports from here; this package imports the runtime and `convert`."""
