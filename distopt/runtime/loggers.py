"""Built-in loggers: TensorBoard event files and MLflow runs, as driver-side callbacks.

Each imports its library when built (so ``RunConfig(callbacks=[...])`` fails before Ray
starts when it is missing, naming the package to install) and never on workers.
Training values go under ``train/``, evaluation values under ``eval/``.
:func:`resolve_callbacks` builds ``RunConfig.callbacks``, where these go by name.
"""
from __future__ import annotations

import importlib
from typing import Any, Sequence

from distopt.runtime.callbacks import HOOKS, Callback, Callbacks, FunctionCallback, scalars


def _split(record: dict) -> tuple[dict, dict]:
    """A step record's training values and its evaluation values (``eval_`` keys)."""
    values = scalars(record)
    train = {f"train/{k}": v for k, v in values.items() if not k.startswith("eval_")}
    evals = {f"eval/{k[5:]}": v for k, v in values.items() if k.startswith("eval_")}
    return train, evals


class TensorBoardLogger(Callback):
    """Writes each step's values to TensorBoard event files under ``log_dir``.

    Args:
        log_dir: folder for the event files (``tensorboard --logdir`` it).

    Raises:
        ImportError: the ``tensorboard`` package is missing (``pip install tensorboard``).
    """

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(f"TensorBoardLogger needs the tensorboard package ({e}): pip install tensorboard, "
                              f"or pip install 'distopt[tensorboard]'") from None
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)

    def on_step_end(self, record: dict) -> None:
        train, _ = _split(record)
        for tag, value in train.items():
            self.writer.add_scalar(tag, value, int(record["step"]))

    def on_eval(self, record: dict) -> None:
        _, evals = _split(record)
        for tag, value in evals.items():
            self.writer.add_scalar(tag, value, int(record["step"]))
        self.writer.flush()  # evaluations are rare and worth seeing at once

    def on_failure(self, record: dict) -> None:
        self.writer.add_text("failures", ", ".join(f"{k}: {v}" for k, v in record.items()), int(record["step"]))

    def on_fit_end(self, result: Any) -> None:
        self.writer.close()

    def __repr__(self) -> str:
        return f"TensorBoardLogger({self.log_dir!r})"


class MLflowLogger(Callback):
    """Logs each step's values, failures and the final summary to an MLflow run.

    Args:
        experiment: MLflow experiment name (None: MLflow's default or ``MLFLOW_EXPERIMENT_NAME``).
        run_name: name of the run MLflow starts at the first record.
        tracking_uri: where MLflow stores runs (None: ``MLFLOW_TRACKING_URI`` or ``./mlruns``).

    Raises:
        ImportError: mlflow is missing (``pip install 'distopt[mlflow]'``).
    """

    def __init__(self, experiment: str | None = None, run_name: str | None = None,
                 tracking_uri: str | None = None) -> None:
        try:
            import mlflow
        except ImportError as e:
            raise ImportError(f"MLflowLogger needs mlflow ({e}): pip install 'distopt[mlflow]' "
                              f"(or mlflow-skinny)") from None
        self.mlflow, self.experiment, self.run_name, self.tracking_uri = mlflow, experiment, run_name, tracking_uri
        self.run = None

    def _active(self) -> Any:
        if self.run is None:
            if self.tracking_uri is not None:
                self.mlflow.set_tracking_uri(self.tracking_uri)
            if self.experiment is not None:
                self.mlflow.set_experiment(self.experiment)
            self.run = self.mlflow.start_run(run_name=self.run_name)
        return self.run

    def on_step_end(self, record: dict) -> None:
        self._active()
        train, _ = _split(record)
        self.mlflow.log_metrics(train, step=int(record["step"]))

    def on_eval(self, record: dict) -> None:
        self._active()
        _, evals = _split(record)
        self.mlflow.log_metrics(evals, step=int(record["step"]))

    def on_failure(self, record: dict) -> None:
        self._active()
        self.mlflow.set_tag(f"failure.step{record['step']}.rank{record['rank']}",
                            f"{record.get('cause')}; {record.get('action')}")

    def on_fit_end(self, result: Any) -> None:
        self._active()
        summary = scalars(dict(getattr(result, "summary", {}) or {}), skip=())
        self.mlflow.log_metrics({f"summary/{k}": v for k, v in summary.items()})
        self.mlflow.end_run()
        self.run = None

    def __repr__(self) -> str:
        return f"MLflowLogger(experiment={self.experiment!r})"


def resolve_callbacks(specs: Sequence[Any], out_dir: str | None) -> Callbacks:
    """Check and build the callbacks of ``RunConfig.callbacks``, on the driver, before Ray starts.

    Args:
        specs: callback objects, plain callables, or names: ``"tensorboard"`` (event files
            in ``out_dir/tensorboard``), ``"mlflow"``, or ``"pkg.module:attribute"`` (an
            object, or a class or factory called with no arguments).
        out_dir: the run's output folder (``RunConfig.out_dir``).

    Raises:
        TypeError: an entry with none of the hooks that is not callable either.
        ValueError, ImportError: a name that cannot be built (the message names the fix).
    """
    built = []
    for i, spec in enumerate(specs):
        cb = _named(spec, out_dir, i) if isinstance(spec, str) else spec
        if isinstance(cb, type):
            raise TypeError(f"RunConfig.callbacks[{i}] is the class {cb.__name__}: pass an instance, "
                            f"e.g. {cb.__name__}()")
        if any(callable(getattr(cb, h, None)) for h in HOOKS):
            built.append(cb)
        elif callable(cb) and not isinstance(cb, type):
            built.append(FunctionCallback(cb))
        else:
            raise TypeError(f"RunConfig.callbacks[{i}] is a {type(cb).__name__}, which has none of the hooks "
                            f"{', '.join(HOOKS)} and is not callable: subclass distopt.Callback, or pass a "
                            f"function of the step record")
    return Callbacks(built)


def _named(spec: str, out_dir: str | None, i: int) -> Any:
    if spec in ("tensorboard", "mlflow"):
        if spec == "mlflow":
            return MLflowLogger()
        if out_dir is None:
            raise ValueError(f"RunConfig.callbacks[{i}]='tensorboard' writes to out_dir/tensorboard: set "
                             f"RunConfig.out_dir, or pass distopt.TensorBoardLogger(log_dir=...)")
        return TensorBoardLogger(f"{out_dir}/tensorboard")
    module, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"RunConfig.callbacks[{i}]={spec!r} cannot be imported ({e}): name an importable "
                         f"'pkg.module:attribute'") from None
    return obj() if isinstance(obj, type) else obj
