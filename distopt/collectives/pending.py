"""An asynchronous collective's handle: started now, completed (and checked) on ``wait``."""
from __future__ import annotations

from typing import Callable, Protocol


class Waiter(Protocol):
    """What a handle needs of its communicator: how long a work may take, and how a failure
    is reported (``TorchCommunicator`` is one)."""

    _wait_timeout: object

    def _failed(self, name: str, e: BaseException) -> Exception: ...


class Pending:
    """A collective in flight; :meth:`wait` completes it and returns its result.

    Raises (from ``wait``): CollectiveError within the communicator's timeout.
    """

    def __init__(self, comm: Waiter | None, name: str, works: list,
                 finish: Callable[[], object]) -> None:
        self.comm, self.name, self._works, self._finish = comm, name, works, finish
        self._done, self._result = False, None

    def wait(self):
        """Block until done (at most the timeout per work); the collective's result."""
        if not self._done:
            try:
                timeout = self.comm._wait_timeout if self._works else None
                for work in self._works:
                    work.wait() if timeout is None else work.wait(timeout)
            except Exception as e:
                raise self.comm._failed(self.name, e) from e
            self._result, self._done = self._finish(), True
        return self._result


def completed(value: object, async_op: bool):
    """``value``, or with ``async_op`` a handle already done whose ``wait`` returns it."""
    return Pending(None, "done", [], lambda: value) if async_op else value


def then(finish: Callable[[], object], async_op: bool):
    """``finish()`` now, or with ``async_op`` a handle that calls it on ``wait``.

    ``finish`` may wait on collectives already started; it must not start new ones, since
    ranks may wait in different orders.
    """
    return Pending(None, "then", [], finish) if async_op else finish()
