"""Ctrl-C's stop flag and the callbacks run when it is first set."""
from components import interrupt


def test_stop_callbacks_run_once_on_the_first_request_and_reset_clears_them():
    calls = []
    interrupt.reset()
    try:
        interrupt.on_stop(lambda: calls.append("a"))
        interrupt.on_stop(lambda: calls.append("b"))
        assert not interrupt.stop_requested() and calls == []
        interrupt.request_stop()
        interrupt.request_stop()   # a second Ctrl-C: the callbacks already ran
        assert interrupt.stop_requested() and calls == ["a", "b"]
        interrupt.reset()
        interrupt.request_stop()
        assert calls == ["a", "b"]   # reset dropped them
    finally:
        interrupt.reset()
