"""kdcache: cache a large teacher's sparse soft labels once, distill small students from the cache many times.

The Python API (docs/api.md): `build_cache`, `train`, `run_eval` and `compare_runs`, each taking the typed config
the matching CLI command reads (`load_config` reads a YAML spec and `key=value` overrides the same way). They are
imported on first use, so `import kdcache` stays light.
"""

__version__ = "0.1.0"

_API = {
    "build_cache": "kdcache.teacher.build", "train": "kdcache.train.trainer", "run_eval": "kdcache.eval.runner",
    "compare_runs": "kdcache.eval.compare", "load_criteria": "kdcache.eval.criteria",
    "CacheBuildConfig": "kdcache.config", "TrainConfig": "kdcache.config", "EvalConfig": "kdcache.config",
    "load_config": "kdcache.config",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
