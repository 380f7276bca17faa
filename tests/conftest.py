"""One persistent JAX compilation cache for the whole test session.

Many tests train the same default model at the same tiny shapes, in this process or in a
`bin/run.py` subprocess (which inherits the environment); with the cache only the first
pays the compile (a cached executable is the same program: the same numbers as a fresh
compile). The cache lives in a fresh temporary folder, so no test reads another
session's executables. Tests that count compilations count cache hits too.
"""
import os
import shutil
import tempfile

_CACHE = tempfile.mkdtemp(prefix='coseg_jax_tests_jit_')
# Set before any test module imports jax, so this process reads it too.
os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='1',
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(_CACHE, ignore_errors=True)
