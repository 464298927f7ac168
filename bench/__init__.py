"""Benchmarks for SPEC §6: an instant fake backend, load generators, and the side-by-side runner.

`make bench-setup` prepares the LiteLLM baseline (`bench.setup_litellm`); `make bench` runs
`bench.run`. Nothing here is imported by the `meshnode` package.
"""
