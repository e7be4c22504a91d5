"""distopt: data-parallel training with sharded optimizer state, on Ray.

``import distopt`` does not import Ray: the gradient API, collectives and optimizer work
on any machine; ``distopt.Trainer`` loads the Ray runtime on first use.
"""
from distopt import collectives, optim
from distopt.gradients import (
    adam_update, execute_with_gradients, gradient_descent_update, is_variable, stop_gradient, variable,
)

__version__ = "0.1.0"

__all__ = [
    "variable", "is_variable", "execute_with_gradients", "gradient_descent_update", "adam_update",
    "stop_gradient", "collectives", "optim", "Trainer", "FitResult", "WorkerError", "WorkerLost",
    "PlacementError", "TrainingError", "ScalingConfig", "FailureConfig", "CheckpointConfig", "RunConfig",
    "Callback", "CallbackError", "TensorBoardLogger", "MLflowLogger",
]

_LAZY = {
    "Trainer": "distopt.runtime.trainer", "FitResult": "distopt.runtime.trainer",
    "WorkerError": "distopt.runtime.errors", "WorkerLost": "distopt.runtime.errors",
    "PlacementError": "distopt.runtime.errors", "TrainingError": "distopt.runtime.errors",
    "ScalingConfig": "distopt.runtime.groups", "FailureConfig": "distopt.runtime.groups",
    "CheckpointConfig": "distopt.runtime.groups", "RunConfig": "distopt.runtime.groups",
    "Callback": "distopt.runtime.callbacks", "CallbackError": "distopt.runtime.callbacks",
    "TensorBoardLogger": "distopt.runtime.loggers", "MLflowLogger": "distopt.runtime.loggers",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distopt' has no attribute {name!r}")
