"""Evaluation: throughput benchmarks and (later) the reasoning on/off harness."""
