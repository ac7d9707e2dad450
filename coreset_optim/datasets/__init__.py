"""Data for the demo, the examples and the benchmarks: apart from the method, never imported by it.

``synthetic``: the from-scratch token-sequence mixture of the earlier benchmarks.
"""
