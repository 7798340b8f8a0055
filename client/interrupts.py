"""How a client run ends on a signal: Ctrl-C, SIGTERM or SIGHUP unwind the stack, so that a server the run started
is stopped by its `with` block, and the run ends in one line with the shell's status for that signal.

A handler that raises does so between any two bytecodes of the main thread. Inside an event loop those can be
asyncio's own: a teardown cut short leaves the loop unclosed, and it fails again later, in a finalizer that prints
a traceback. So while `run` runs a coroutine, a signal cancels it instead (what asyncio.run does for Ctrl-C), and
Interrupted is raised once the loop has closed.
"""
import asyncio
import contextlib
import signal
import sys
import threading
import types
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that `with` blocks (a server's) unwind."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Running:
    """The coroutine `run` runs in the main thread, if any, and the signals it received."""
    task: asyncio.Task | None = None
    received: list[int] | None = None


def _interrupt(signum: int, frame: types.FrameType | None) -> None:
    received = _Running.received
    if received is None:
        raise Interrupted(signum)
    received.append(signum)
    task = _Running.task
    if task is not None and not task.done():
        task.cancel()
        task.get_loop().call_soon_threadsafe(lambda: None)  # wakes a loop asleep in select()


@contextlib.contextmanager
def stopping_cleanly_on_signals() -> Iterator[None]:
    """Within this block, SIGTERM and SIGHUP unwind the stack like Ctrl-C instead of ending the process where it
    stands (which would leave, e.g., a server it started running)."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, which a SIGTERM or SIGHUP (within stopping_cleanly_on_signals) ends as asyncio ends it on
    Ctrl-C: the coroutine is cancelled, its `finally` blocks run inside the loop, the loop closes, and then
    Interrupted is raised here."""
    if threading.current_thread() is not threading.main_thread():  # signals interrupt only the main thread
        return asyncio.run(coroutine)

    async def tracked() -> T:
        _Running.task = asyncio.current_task()
        if _Running.received:  # a signal came before there was a task to cancel
            coroutine.close()  # never started: nothing to unwind, and no "never awaited" warning
            raise asyncio.CancelledError
        return await coroutine

    _Running.received = []
    try:
        try:
            result = asyncio.run(tracked())
        except asyncio.CancelledError:
            if not _Running.received:
                raise
    finally:
        received = _Running.received
        _Running.task = _Running.received = None
    if received:
        raise Interrupted(received[0])
    return result


def interrupted(e: KeyboardInterrupt) -> int:
    """One line instead of a traceback, and the shell's exit status for a process ended by that signal."""
    signum = getattr(e, "signum", signal.SIGINT)
    print(f"\nstopped ({signal.Signals(signum).name})", file=sys.stderr)
    return 128 + signum
