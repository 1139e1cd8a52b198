"""Directory backends: the principal model, the Directory interface, caching and the backends themselves.

This layer imports nothing from ``mailroster.protocols`` or ``mailroster.daemon``.
"""
