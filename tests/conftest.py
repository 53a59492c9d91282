"""Test setup: JAX on the CPU with 8 forced host devices, so pmap / shard_map paths run anywhere.

The flags must be set before jax is imported anywhere in the test session.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
