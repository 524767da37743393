"""Throughput and memory benchmarks (bench.py) and the paper replication."""
