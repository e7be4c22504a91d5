"""What the data layer raises: bad input names the sample or the shard, a dead loader its worker."""
from __future__ import annotations


class DataError(ValueError):
    """The data cannot give the step its samples: a stream too short for one global batch, a
    reader that raised or changed the samples' structure, a missing or truncated shard. The
    message names the epoch, sample, shard or record, and the fix."""


class LoaderDied(RuntimeError):
    """A background loader process died (killed, out of memory). The rank cannot go on with
    its batches; the runtime treats this as a failure of the worker itself, which the normal
    recovery replaces."""
