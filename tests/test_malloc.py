"""The C heap kept while training and generating (glibc's mallopt), and its opt-outs."""

import subprocess
import sys
import textwrap

import pytest

import scldiff
from scldiff import _malloc

from .conftest import QUIET

MIB = 2**20


class FakeLibc:
    """Records mallopt and malloc_trim calls in place of glibc."""

    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fake_libc(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(_malloc, "glibc", lambda: libc)
    for name in [n for n in _malloc.os.environ if n.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    return libc


KEEP = [("mallopt", -3, 32 * MIB), ("mallopt", -1, 256 * MIB)]
RESTORE = [("mallopt", -1, 64 * MIB), ("malloc_trim", 0)]


def test_heap_kept_sets_the_thresholds_once_and_restores_after_the_outermost(fake_libc):
    with _malloc.heap_kept():
        assert fake_libc.calls == KEEP
        with _malloc.heap_kept():  # nested: nothing more
            pass
        assert fake_libc.calls == KEEP
    assert fake_libc.calls == KEEP + RESTORE
    fake_libc.calls.clear()
    with pytest.raises(RuntimeError), _malloc.heap_kept():  # restored on an error too
        raise RuntimeError
    assert fake_libc.calls == KEEP + RESTORE


def test_heap_kept_leaves_the_allocator_to_the_user(fake_libc, monkeypatch):
    monkeypatch.setattr(scldiff.settings, "heap_tuning", False)
    with _malloc.heap_kept():
        pass
    monkeypatch.setattr(scldiff.settings, "heap_tuning", True)
    for name, value in (("MALLOC_ARENA_MAX_", "2"),
                        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with _malloc.heap_kept():
                pass
    assert fake_libc.calls == []
    with pytest.raises(TypeError, match="heap_tuning must be True or False"):
        scldiff.settings.heap_tuning = 1
    assert scldiff.settings.heap_tuning is True


def test_training_and_generation_keep_the_heap(fake_libc, trained_model):
    trained_model.generate(n_samples=20, seed=0, progress_bar=False)
    assert fake_libc.calls == KEEP + RESTORE
    fake_libc.calls.clear()
    model = scldiff.LapDDPM(trained_model.adata, n_latent=4, n_hidden=16)
    model.train(n_epochs_stage_a=1, n_epochs_stage_b=1, **QUIET)
    assert fake_libc.calls == 2 * (KEEP + RESTORE)  # one block per stage


@pytest.mark.skipif(_malloc.glibc() is None, reason="glibc only")
def test_freed_memory_is_reused_without_page_faults_while_the_heap_is_kept():
    # in a fresh process, rounds of 24 blocks of 8 MiB written and freed: with glibc's
    # defaults every round faults its pages in anew (the freed memory went back to the
    # system); with the heap kept, the rounds after the first reuse the first one's
    script = textwrap.dedent("""
        import resource, sys
        import numpy as np
        from scldiff import _malloc

        def rounds():
            faults = []
            for _ in range(3):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                blocks = [np.ones(2**20) for _ in range(24)]
                del blocks
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            return faults

        if sys.argv[1] == "kept":
            with _malloc.heap_kept():
                print(*rounds())
        else:
            print(*rounds())
    """)
    env = {k: v for k, v in _malloc.os.environ.items() if not k.startswith("MALLOC_")}
    faults = {mode: [int(f) for f in subprocess.run(
        [sys.executable, "-c", script, mode], env=env, capture_output=True, text=True,
        check=True).stdout.split()] for mode in ("default", "kept")}
    default, kept = faults["default"], faults["kept"]
    assert min(default) > 1000  # the premise: with the defaults, every round faults
    assert max(kept[1:]) < min(default) // 20
