"""Side-by-side benchmark of dflash-lab against SpecForge and vLLM's speculators (issue 25).

One module per tool (install, features, train, export) plus `common`; bench/bench_peers.py drives them.
"""
