"""Test session setup: a persistent XLA compilation cache, so a program one test compiled is loaded, not compiled
again, by later tests of the same pytest-xdist worker and by the CLI and notebook processes they start.

One directory per worker (nothing reads an entry while another process writes it), under `.jax_test_cache/` in the
checkout: a fresh clone starts empty, so CI measures the suite with its own compilations.
"""
import os
from pathlib import Path

import jax

CACHE = Path(__file__).resolve().parents[1] / ".jax_test_cache" / os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(CACHE)  # processes the tests start
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
jax.config.update("jax_compilation_cache_dir", str(CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
