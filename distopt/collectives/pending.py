"""An asynchronous collective's handle: started now, completed (and checked) on ``wait``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from distopt.collectives.torch_dist import TorchCommunicator


class Pending:
    """A collective in flight; :meth:`wait` completes it and returns its result.

    Raises (from ``wait``): CollectiveError within the communicator's timeout.
    """

    def __init__(self, comm: "TorchCommunicator | None", name: str, works: list,
                 finish: Callable[[], object]) -> None:
        self.comm, self.name, self._works, self._finish = comm, name, works, finish
        self._done, self._result = False, None

    def wait(self):
        """Block until done (at most the timeout per work); the collective's result."""
        if not self._done:
            try:
                for work in self._works:
                    work.wait(self.comm._timeout)
            except Exception as e:
                raise self.comm._failed(self.name, e) from e
            self._result, self._done = self._finish(), True
        return self._result


def completed(value: object, async_op: bool):
    """``value``, or with ``async_op`` a handle already done whose ``wait`` returns it."""
    return Pending(None, "done", [], lambda: value) if async_op else value
