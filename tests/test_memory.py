"""dials_cnn.memory: freed large blocks are kept, so the next array of that size is not page-faulted in again."""

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import resource
    import numpy as np
    from dials_cnn.memory import keep_freed_memory

    def faults_per_array(n=20, megabytes=40):  # above glibc's largest dynamic mmap threshold (32 MiB)
        a = np.ones(megabytes << 17); del a
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            a = np.ones(megabytes << 17); a += 1; del a
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n

    plain = faults_per_array()
    keep_freed_memory()
    kept = faults_per_array()
    print(plain, kept)
    """
)


def test_keep_freed_memory_stops_the_page_faults_of_reallocated_arrays():
    # A fresh process: the test process may have called it already (classification does).
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    plain, kept = map(float, out.split())
    assert plain > 0, out
    assert kept * 10 <= plain, out
