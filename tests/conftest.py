"""Test-wide setup: 8 emulated CPU devices and strict rank promotion.

The device count must be fixed before jax is imported, so this happens at import time of the
conftest, which pytest loads before any test module.
"""
import atexit
import os
import shutil
import tempfile

# Known XLA:CPU hazard with emulated devices (jax 0.10.2): on a machine with fewer cores than
# devices, an all-reduce of a large enough program can wait forever for its last device thread,
# and XLA aborts the process after 40 s ("Expected 8 threads to join the rendezvous, but only 7
# of them arrived"). It hit the 600-step quickstart on 8 emulated devices in about 1 run in 5
# here (more under load); no flag of this jaxlib avoided it (--xla_cpu_use_thunk_runtime is
# ignored, --xla_cpu_multi_thread_eigen=false did not help). So the tests keep 8-device training
# to tiny nets and short runs (which never hit it in 9 full suites, one under heavy load), and run
# the long quickstart as the README does, in a fresh one-device process.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import chex  # noqa: E402
import pytest  # noqa: E402

# Catch silent broadcasting bugs like (B,) + (B, 1) -> (B, B) (equinox's tests do the same).
jax.config.update("jax_numpy_rank_promotion", "raise")


# Many tests build the same small programs from fresh closures; jax's persistent compilation
# cache recognises identical programs across tests (2.5x faster suite). One fresh cache per test
# process: jax writes cache files in place (not atomically), so a second pytest-xdist worker
# reading a file being written can load a truncated executable and abort; and a run killed
# mid-write must not leave a truncated file for the next run.
_JIT_CACHE = tempfile.mkdtemp(prefix="jaxvision-test-jit-cache-")
atexit.register(shutil.rmtree, _JIT_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _JIT_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

@pytest.fixture(autouse=True)
def _clear_trace_counter():
    chex.clear_trace_counter()
    yield


@pytest.fixture(autouse=True, scope="session")
def _temp_files_under_pytest(tmp_path_factory):
    """Libraries' own temp dirs (tfds's mock_data leaves empty ones) go under pytest's tmp."""
    previous = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
    os.environ["TMPDIR"] = tempfile.tempdir  # and subprocesses' too
    yield
    tempfile.tempdir = previous[0]
    if previous[1] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = previous[1]
