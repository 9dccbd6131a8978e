"""The shared BLAS thread limit: restored by whichever caller thread leaves last."""

import threading

import pytest

from anomstats import _parallel


def _blas_threads(threadpoolctl):
    return [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]


def test_limit_is_restored_when_the_last_thread_out_is_not_the_first_in():
    # threadpoolctl lets only the thread that first changed OpenBLAS's limit change it again while
    # that thread is alive; here the first thread in leaves early but stays alive, and the second
    # thread, leaving last, must still restore the original limit.
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if _parallel.blas_controller() is None:
        pytest.skip("no BLAS library under threadpoolctl's control")
    before = _blas_threads(threadpoolctl)
    first_in, second_in, first_out, second_out, release = (threading.Event() for _ in range(5))
    seen_inside = []

    def first():
        with _parallel.single_threaded_blas():
            first_in.set()
            second_in.wait(5)
            seen_inside.append(_blas_threads(threadpoolctl))
        first_out.set()
        release.wait(5)  # stay alive while the other thread restores

    def second():
        first_in.wait(5)
        with _parallel.single_threaded_blas():
            second_in.set()
            first_out.wait(5)
        second_out.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    assert second_out.wait(10)
    try:
        assert seen_inside == [[1] * len(before)]
        assert _blas_threads(threadpoolctl) == before
    finally:
        release.set()
        for t in threads:
            t.join()
