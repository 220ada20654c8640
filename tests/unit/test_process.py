"""Serving processes leave Ray's nice 15 for normal priority, on every thread (Linux nices per thread)."""

import os
import subprocess
import sys
import textwrap


def test_every_thread_and_later_children_run_at_normal_priority():
    script = textwrap.dedent("""
        import os, subprocess, sys, threading, time
        os.nice(15)  # what Ray's raylet does to its workers
        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()  # a thread from before
        from raystack.process import restore_normal_priority
        restore_normal_priority()
        threads = [os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")]
        child = subprocess.run([sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"],
                               capture_output=True, text=True).stdout.strip()
        print(len(threads), max(threads), child)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    count, worst, child = out.stdout.split()
    assert int(count) >= 2
    if os.geteuid() == 0:  # raising priority needs CAP_SYS_NICE
        assert (worst, child) == ("0", "0")
    else:
        assert "RAY_worker_niceness=0" in out.stderr
