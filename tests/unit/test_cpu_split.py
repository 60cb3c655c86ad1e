"""benchmarks.cpu_split reads per-thread CPU time from /proc."""

from __future__ import annotations

import os
import threading
import time

from benchmarks.cpu_split import thread_cpu


def test_thread_cpu_sees_a_busy_thread_and_the_main_thread() -> None:
    stop = time.monotonic() + 0.3
    busy_ids: list[int] = []

    def spin() -> None:
        busy_ids.append(threading.get_native_id())
        while time.monotonic() < stop:
            pass

    before = thread_cpu(os.getpid())
    worker = threading.Thread(target=spin)
    worker.start()
    time.sleep(0.05)
    during = thread_cpu(os.getpid())
    worker.join()
    assert os.getpid() in before and os.getpid() in during
    (busy,) = busy_ids
    assert busy in during and busy not in before
    assert all(seconds >= 0 for seconds in during.values())
