"""A real Twisted reactor for pytest: the global reactor runs in a daemon thread for the rest of
the session, and test code hands it work with :func:`call`.

Usage::

    from twisted_helpers import call
    from twisted_helpers import reactor_thread  # noqa: F401  (a fixture, used by name)

    def test_something(reactor_thread):
        result = call(lambda: client.describe())   # a Deferred, coroutine or plain value

(``tests/`` has no ``__init__.py``: pytest puts the directory on ``sys.path``.)

Rules: the reactor cannot be restarted, so nobody else may ``run()`` or ``stop()`` it in this
process; code that needs Buildbot's ``TestReactor`` does not need this module at all. The
session fixture stops the reactor at the very end so that its thread pool shuts down cleanly.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _global_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def ensure_reactor_running(timeout: float = 10.0) -> Any:
    """Start the global reactor in a background thread (once); return it."""
    global _thread
    reactor = _global_reactor()
    with _lock:
        if _thread is None:
            if reactor.running:
                raise RuntimeError("the global reactor is already run by someone else")
            started = threading.Event()
            reactor.callWhenRunning(started.set)
            # Daemon pool threads: a session that forgets to stop the reactor must still exit.
            pool = reactor.getThreadPool()
            pool.threadFactory = functools.partial(threading.Thread, daemon=True)
            _thread = threading.Thread(
                target=reactor.run,
                kwargs={"installSignalHandlers": False},
                name="twisted-reactor",
                daemon=True,
            )
            _thread.start()
            if not started.wait(timeout):
                raise RuntimeError("the Twisted reactor did not start")
        elif not _thread.is_alive():
            raise RuntimeError("the Twisted reactor thread has stopped; it cannot be restarted")
    return reactor


def stop_reactor(timeout: float = 10.0) -> None:
    """Stop the background reactor (end of session only: it cannot be started again)."""
    reactor = _global_reactor()
    with _lock:
        thread = _thread
    if thread is None or not thread.is_alive():
        return
    reactor.callFromThread(reactor.stop)
    thread.join(timeout)


def call(fn: Callable[..., Any], *args: Any, timeout: float = 15.0, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in the reactor thread and wait for its outcome.

    Deferreds and coroutines are awaited; their failures are re-raised here. Everything ``fn``
    does before it returns happens in one reactor turn. After ``timeout`` seconds the Deferred
    is cancelled and TimeoutError raised.
    """
    reactor = ensure_reactor_running()
    done = threading.Event()
    box: dict[str, Any] = {}

    def finish(result: Any) -> None:
        box["result"] = result
        done.set()

    def start() -> None:
        d = defer.maybeDeferred(fn, *args, **kwargs)
        box["deferred"] = d
        d.addBoth(finish)

    reactor.callFromThread(start)
    if not done.wait(timeout):
        if "deferred" in box:
            reactor.callFromThread(box["deferred"].cancel)
        raise TimeoutError(f"{getattr(fn, '__name__', fn)!r} did not finish in {timeout}s")
    result = box["result"]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``predicate`` (run in the reactor thread) until truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = call(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or predicate!r}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def reactor_thread() -> Any:
    """The global reactor, running in a background thread until the session ends."""
    reactor = ensure_reactor_running()
    yield reactor
    stop_reactor()
