"""Benchmarks: the engine-independent part.

* :mod:`jointface.bench.protocols` - deterministic LFW splits of the benchmark
  protocols P1-P3 (``../shared/PROTOCOLS.md``);
* :mod:`jointface.bench.metrics` - CMC, FPIR/TPIR, DET, 10-fold verification
  accuracy, IoU (pure numpy);
* :mod:`jointface.bench.plots` - DET and CMC figures, markdown tables.

Nothing here runs an engine: callers turn images into scores and hand the
scores to these functions.
"""
