"""Wire protocols: one module per protocol, each a sans-IO codec plus a thin asyncio adapter.

Modules here talk to a lookup service through :mod:`.service` and use only the model, outcomes and errors of
``mailroster.backends``; they never import a backend implementation or ``mailroster.daemon``.
"""
