"""Test set-up: 8 virtual CPU devices and a private cache folder, set before anything imports jax.

The device flag must be set before jax is first imported, which is why it lives here.
"""
import os
import tempfile

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES_FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Demo corpora and built datasets go to a fresh folder unless the caller chose one (CI does).
os.environ.setdefault("EXVO_CACHE", tempfile.mkdtemp(prefix="exvo-test-cache-"))
# Compiled steps are cached on disk for the session: the trainer tests run the same tiny models several times
# (uninterrupted, interrupted, resumed), and on 2 CPU cores compiling them takes longer than running them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="exvo-test-jit-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
