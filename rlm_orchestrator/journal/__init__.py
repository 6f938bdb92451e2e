"""Durable completions: a journal of everything a completion's namespace and conversation were
built from, so that a lost sandbox is rebuilt exactly and a completion outlives its server.

`store.py` is the interface (an embedded SQLite store and a PostgreSQL one shared by replicas
implement it); the loop writes through `recorder.py`; `replay.py` rebuilds a namespace.
"""
