"""The persistent compilation cache the CLI turns on: where it goes, how it is switched off, and that a
second process reuses it without changing a byte of the output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedtensor import jit_cache


@pytest.fixture
def no_jax(monkeypatch):
    """Pretend JAX is not imported yet (the helper only acts before JAX reads its configuration)."""
    monkeypatch.delitem(sys.modules, "jax", raising=False)


def test_default_directory_follows_xdg(tmp_path):
    assert jit_cache.default_directory({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "fedtensor" / "jax"
    assert jit_cache.default_directory({}) == Path.home() / ".cache" / "fedtensor" / "jax"


def test_enable_sets_jax_environment(tmp_path, no_jax):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    path = jit_cache.enable_persistent_cache(environ=env)
    assert path == tmp_path / "fedtensor" / "jax" and path.is_dir()
    assert path.stat().st_mode & 0o077 == 0  # this user's only: others could plant compiled programs
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(path)
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"  # the codec's programs all compile fast


def test_jax_own_setting_wins(tmp_path, no_jax):
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine")}
    assert jit_cache.enable_persistent_cache(tmp_path / "other", environ=env) == tmp_path / "mine"
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "mine")


@pytest.mark.parametrize("value", ["0", "off", "no", "false", "OFF"])
def test_switched_off(tmp_path, no_jax, value):
    env = {"XDG_CACHE_HOME": str(tmp_path), jit_cache.ENV_SWITCH: value}
    assert jit_cache.enable_persistent_cache(environ=env) is None
    assert "JAX_COMPILATION_CACHE_DIR" not in env and not (tmp_path / "fedtensor").exists()


def test_too_late_once_jax_is_imported(tmp_path):
    import jax  # noqa: F401 — JAX has read its configuration: setting the environment would do nothing

    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert jit_cache.enable_persistent_cache(environ=env) is None and env == {"XDG_CACHE_HOME": str(tmp_path)}


def test_unwritable_directory_is_skipped(tmp_path, no_jax):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    env = {"XDG_CACHE_HOME": str(blocker)}
    assert jit_cache.enable_persistent_cache(environ=env) is None and "JAX_COMPILATION_CACHE_DIR" not in env


def test_an_existing_directory_this_user_cannot_write_is_skipped(tmp_path, no_jax, monkeypatch):
    """mkdir(exist_ok) accepts it, and JAX then warned at every compilation (checked with os.access:
    the tests may run as root, whom permissions do not stop)."""
    monkeypatch.setattr(jit_cache.os, "access", lambda path, mode: False)
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert jit_cache.enable_persistent_cache(environ=env) is None and "JAX_COMPILATION_CACHE_DIR" not in env


def test_cli_processes_share_compiled_programs(tmp_path):
    """The first ``fedtensor compress`` fills the cache, a second process reuses it; the streams are
    byte-identical."""
    rng = np.random.default_rng(0)
    volume = np.cumsum(rng.normal(size=(24, 20, 16)), axis=0).astype(np.float32)
    np.save(tmp_path / "v.npy", volume)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")
    env.pop(jit_cache.ENV_SWITCH, None)
    streams, listings = [], []
    for name in ("a.ftz", "b.ftz"):
        subprocess.run([sys.executable, "-m", "fedtensor_cli", "compress", str(tmp_path / "v.npy"),
                        str(tmp_path / name), "--json"], env=env, check=True, capture_output=True, timeout=600)
        streams.append((tmp_path / name).read_bytes())
        listings.append(sorted(p.name for p in (tmp_path / "cache" / "fedtensor" / "jax").iterdir()))
    assert listings[0]  # compiled programs on disk after the first process
    assert listings[1] == listings[0]  # the second compiled nothing new: it found every program there
    assert streams[0] == streams[1]


def test_no_home_directory_means_no_cache(no_jax, monkeypatch):
    """A user without a home directory (some containers) gets no cache, not a crash."""
    def homeless():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(homeless))
    env: dict[str, str] = {}
    assert jit_cache.enable_persistent_cache(environ=env) is None and env == {}
