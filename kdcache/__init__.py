"""kdcache: cache a large teacher's sparse soft labels once, distill small students from the cache many times."""

__version__ = "0.1.0"
