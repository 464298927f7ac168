"""The response cache: exact (canonical hash) and semantic (embedding similarity).

`ResponseCache` (service.py) is the one entry point: `lookup()`/`store()`, and `complete()` /
`open_stream()` that wrap the router with both. `key.py` decides eligibility and keys,
`store.py` and `persist.py` keep answers, `replay.py` converts between streams and whole
answers, `semantic.py` holds the index and the `Embedder` interface, `embedders.py` two
implementations of it.
"""

from meshnode.cache.key import CacheDirective
from meshnode.cache.semantic import Embedder
from meshnode.cache.service import CacheServed, Lookup, ResponseCache

__all__ = ["CacheDirective", "CacheServed", "Embedder", "Lookup", "ResponseCache"]
