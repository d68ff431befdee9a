"""The CPU allocator tuning: large freed blocks are reused instead of faulted in again."""
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import resource, torch
    from composer.run.runtime import tune_cpu_allocator

    def faults(n=6):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            x = torch.empty(16 << 20).fill_(1.0)   # 64 MiB: above the largest mmap threshold
            del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

    before = faults()
    assert tune_cpu_allocator() and tune_cpu_allocator()
    faults(40)                          # the heap grows and settles over the first rounds
    after = faults()
    print(before, after)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_tuned_allocator_stops_refaulting_large_blocks():
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    before, after = map(int, p.stdout.split())
    assert before > 6 * 16_000            # every 64 MiB block faulted in again (16k pages)
    assert after < before / 20


def test_opt_out(monkeypatch):
    import composer.run.runtime as rt
    monkeypatch.setattr(rt, "_done", False)
    monkeypatch.setenv("HYCOMP_MALLOC_TUNING", "0")
    assert rt.tune_cpu_allocator() is False
