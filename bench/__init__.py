"""Benchmarks for mailroster: ``python -m bench.run`` (``make bench``).

The benchmark answers, per protocol, how much mailroster costs per request compared with a reference server that
answers the same request: for the Postfix socketmap lookup, the *floor* (:mod:`bench.floor`), a bare asyncio + uvloop
protocol answering from a dict, the cheapest any Python daemon could be; for Dovecot's auth-client (SASL PLAIN) and
auth-master (userdb) protocols, a real Dovecot auth process (:mod:`bench.dovecot`). The load generators
(:mod:`bench.loadgen` for socketmap, :mod:`bench.auth` for Dovecot's protocols) drive both the way Postfix and
Dovecot's own clients do, and :mod:`bench.run` alternates rounds between them and prints ratios, so that machine noise
hits both alike and the ratio, not the absolute number, is what is compared between runs and machines.
"""
