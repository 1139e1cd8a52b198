"""Benchmarks for mailroster: ``python -m bench.run`` (``make bench``).

The benchmark answers one question: how much does mailroster cost per Postfix socketmap lookup, compared with the
cheapest Python server that could answer the same lookup? That server is the *floor* (:mod:`bench.floor`), a bare
asyncio + uvloop protocol answering from a dict. The load generator (:mod:`bench.loadgen`) drives both the way
Postfix does, and :mod:`bench.run` alternates rounds between them and prints ratios, so that machine noise hits both
alike and the ratio, not the absolute number, is what is compared between runs and machines.
"""
