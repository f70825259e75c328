"""The deterministic-GPU-ops request made when fedtensor is imported."""

import os
import subprocess
import sys

from fedtensor.reproducible import FLAG, request_deterministic_gpu_ops


def test_flag_added_to_empty_and_existing_flags():
    env = {}
    assert request_deterministic_gpu_ops(env)
    assert env["XLA_FLAGS"] == f"{FLAG}=true"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert request_deterministic_gpu_ops(env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}=true"


def test_users_own_setting_wins():
    env = {"XLA_FLAGS": f"{FLAG}=false"}
    assert not request_deterministic_gpu_ops(env)
    assert env["XLA_FLAGS"] == f"{FLAG}=false"


def test_import_sets_it_and_this_jaxlib_accepts_it():
    # XLA aborts the process on a flag it does not know: this is what guards against a jaxlib without it.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = ("import os, fedtensor, jax.numpy as jnp; print(os.environ['XLA_FLAGS']); "
            "print(float(jnp.arange(4.0).sum()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"{FLAG}=true", "6.0"]
