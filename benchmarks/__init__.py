"""distopt benchmarks: step time, the allreduce layer, the update kernel, memory and
traffic, and a cost model. ``python -m benchmarks.run_all`` runs them all and writes
``benchmarks/RESULTS.md``; each ``benchmarks.bench_*`` module also runs alone.

Benchmarks never assert: they print and record each goal, whether it holds and by how
much it falls short.
"""
