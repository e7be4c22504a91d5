"""``distopt train``: parsing, --config merge, user-code resolution, optimizer set-up. No Ray."""
from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

import cli_fixture_module as fixture
import distopt
from distopt.optim.rules import SGD, Adam
from distopt.optim.schedules import Constant, WarmupCosine
from launch import cli
from launch.inputs import UsageError, resolve

CODE = ["--model", "cli_fixture_module:make_model", "--loss", "cli_fixture_module:loss",
        "--data", "cli_fixture_module:dataset"]


@pytest.fixture(autouse=True)
def restore_path(monkeypatch):
    """resolve() puts the current folder on sys.path: undo it after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def parse(*flags: str):
    return cli.parse_args(["train", *CODE, *flags])


def exit_message(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# --- parsing -------------------------------------------------------------------------

def test_defaults():
    args = parse()
    assert (args.workers, args.steps, args.batch_size, args.zero_stage, args.optimizer) == (2, 1000, 64, 1, "adam")
    assert args.lr == 1e-3 and args.address is None and args.progress is None and args.out is None


def test_every_flag_parses():
    args = parse("--workers", "8", "--gpus-per-worker", "1", "--cpus-per-worker", "2", "--zero-stage", "2",
                 "--steps", "50", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--weight-decay",
                 "1e-4", "--warmup-steps", "5", "--schedule", "cosine", "--min-lr", "0.01", "--batch-size", "32",
                 "--grad-accum", "2", "--max-grad-norm", "1.0", "--seed", "3", "--address", "auto",
                 "--out", "runs/x", "--log-every", "5", "--no-progress", "--placement", "SPREAD")
    assert (args.workers, args.gpus_per_worker, args.cpus_per_worker) == (8, 1, 2.0)
    assert (args.momentum, args.grad_accum, args.warmup_steps, args.min_lr) == (0.9, 2, 5, 0.01)
    assert args.address == "auto" and args.progress is False and args.placement == "SPREAD"


def test_missing_code_names_the_flags(capsys):
    err = exit_message(capsys, ["train", "--model", "m:f"])
    assert "missing --loss, --data" in err and "--config" in err


@pytest.mark.parametrize("flags, expected", [
    (["--workers", "0"], "argument --workers: 0 must be >= 1"),
    (["--lr", "fast"], "argument --lr: 'fast' is not a number"),
    (["--max-grad-norm", "0"], "0 must be > 0"),
    (["--zero-stage", "3"], "invalid choice: 3"),
])
def test_bad_numbers_exit_2(capsys, flags, expected):
    assert expected in exit_message(capsys, ["train", *CODE, *flags])


# --- --config ------------------------------------------------------------------------

def write(tmp_path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_config_fills_options_and_flags_override(tmp_path):
    path = write(tmp_path, """
        model = "cli_fixture_module:make_model"
        loss = "cli_fixture_module:loss"
        data = "cli_fixture_module:make_dataset"
        workers = 4
        lr = 3e-4
        schedule = "cosine"
        warmup-steps = 10
        max_grad_norm = 1
        progress = false
    """)
    args = cli.parse_args(["train", "--config", path, "--workers", "8"])
    assert args.workers == 8  # the command line wins
    assert args.lr == 3e-4 and args.schedule == "cosine" and args.warmup_steps == 10
    assert args.max_grad_norm == 1.0 and isinstance(args.max_grad_norm, float) and args.progress is False
    assert args.data == "cli_fixture_module:make_dataset"


@pytest.mark.parametrize("text, expected", [
    ("batch = 64", "unknown key 'batch' (did you mean 'batch_size'?)"),
    ("workers = 0", "workers = 0: 0 must be >= 1"),
    ("workers = 2.5", "'2.5' is not an int"),
    ("workers = true", "must be a single number"),
    ("optimizer = 'lamb'", "is not one of adam, sgd"),
    ("model = 3", "must be a string: write model = \"3\""),
    ("progress = 'yes'", "must be true or false"),
    ("workers = [", "not valid TOML"),
])
def test_bad_config_exits_2_naming_the_key(capsys, tmp_path, text, expected):
    assert expected in exit_message(capsys, ["train", *CODE, "--config", write(tmp_path, text)])


def test_missing_config_file(capsys, tmp_path):
    assert "cannot read it" in exit_message(capsys, ["train", *CODE, "--config", str(tmp_path / "nope.toml")])


# --- resolving user code -------------------------------------------------------------

def test_resolve_objects_and_callables():
    kwargs = cli.build_trainer_kwargs(parse())
    assert kwargs["model"] is fixture.make_model and kwargs["loss"] is fixture.loss
    assert kwargs["data"] is fixture.dataset
    made = cli.build_trainer_kwargs(cli.parse_args(["train", *CODE[:4], "--data", "cli_fixture_module:make_dataset"]))
    assert len(made["data"]) == 64
    assert resolve("cli_fixture_module:Namespace.factory", "--model") is fixture.make_model


def test_module_found_in_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "cwd_task_xyz.py").write_text("def make_model():\n    return 'built'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    importlib.invalidate_caches()
    assert resolve("cwd_task_xyz:make_model", "--model")() == "built"
    assert str(tmp_path) in sys.path


@pytest.mark.parametrize("flag, spec, expected", [
    ("--model", "no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("--model", "cli_fixture_module:make_modle", "has no attribute 'make_modle': did you mean 'make_model'?"),
    ("--model", "cli_fixture_module", "is not of the form pkg.module:attribute"),
    ("--model", "cli_fixture_module:built_model", "is a built Linear; name a function that builds it"),
    ("--model", "cli_fixture_module:not_callable", "is a int, not a callable"),
    ("--loss", "cli_fixture_module:not_callable", "not a function (model, batch) -> loss"),
    ("--data", "cli_fixture_module:needs_an_argument", "it must take no arguments"),
    ("--data", "cli_fixture_module:not_a_dataset", "gave a int: distopt needs a map-style dataset"),
    ("--data", "cli_fixture_module:empty", "is empty"),
])
def test_resolution_errors_name_the_fix(flag, spec, expected):
    argv = dict(zip(CODE[::2], CODE[1::2]), **{flag: spec})
    args = cli.parse_args(["train", *[x for kv in argv.items() for x in kv]])
    with pytest.raises(UsageError) as info:
        cli.build_trainer_kwargs(args)
    assert expected in str(info.value) and spec in str(info.value)


def test_broken_module_imports_are_told_apart(tmp_path, monkeypatch):
    (tmp_path / "needs_dep_xyz.py").write_text("import not_installed_dep_xyz\n")
    (tmp_path / "raises_xyz.py").write_text("raise RuntimeError('bad config in module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError, match="needs the missing module 'not_installed_dep_xyz': pip install it"):
        resolve("needs_dep_xyz:f", "--model")
    with pytest.raises(UsageError, match="raised RuntimeError: bad config in module"):
        resolve("raises_xyz:f", "--model")


# --- optimizer and schedule ----------------------------------------------------------

def test_constant_lr_stays_a_number():
    rule = cli.build_optimizer(parse("--lr", "0.01"))
    assert isinstance(rule, Adam) and rule.lr == 0.01 and not rule.decoupled


def test_warmup_and_cosine_build_schedules():
    assert cli.build_optimizer(parse("--warmup-steps", "10")).lr == Constant(1e-3, 10)
    rule = cli.build_optimizer(parse("--schedule", "cosine", "--steps", "200", "--warmup-steps", "20",
                                     "--min-lr", "1e-5", "--weight-decay", "0.1"))
    assert rule.lr == WarmupCosine(1e-3, 200, 20, 1e-5)  # decays over the whole run
    assert rule.decoupled and rule.weight_decay == 0.1  # --weight-decay with adam is AdamW


def test_sgd_with_momentum():
    rule = cli.build_optimizer(parse("--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9"))
    assert isinstance(rule, SGD) and (rule.lr, rule.momentum) == (0.1, 0.9)


@pytest.mark.parametrize("flags, expected", [
    (["--momentum", "0.9"], "--momentum applies to --optimizer sgd"),
    (["--schedule", "cosine", "--steps", "10", "--warmup-steps", "10"], "use warmup_steps < total_steps"),
    (["--min-lr", "0.1"], "only applies to the cosine schedule"),
    (["--gpus-per-worker", "4", "--workers", "2"], "use --gpus-per-worker 1 and --workers 8"),
])
def test_options_that_do_not_fit_together(flags, expected):
    with pytest.raises(UsageError, match=expected):
        cli.build_trainer_kwargs(parse(*flags))


def test_trainer_kwargs_cover_the_contract():
    kwargs = cli.build_trainer_kwargs(parse("--gpus-per-worker", "1", "--grad-accum", "2", "--out", "runs/x"))
    assert kwargs["use_gpu"] is True and kwargs["gradient_accumulation_steps"] == 2 and kwargs["out_dir"] == "runs/x"
    assert set(kwargs) == {"model", "loss", "data", "optimizer", "global_batch_size", "num_workers", "use_gpu",
                           "zero_stage", "seed", "gradient_accumulation_steps", "max_grad_norm", "log_every",
                           "out_dir", "progress", "ray_address", "num_cpus_per_worker", "placement_strategy",
                           "checkpoint_dir", "checkpoint_every", "keep_last", "resume_from", "max_failures",
                           "spare_workers", "min_workers", "grow_back"}
    assert kwargs["grow_back"] is True
    fault_flags = parse("--spare-workers", "1", "--min-workers", "2", "--no-grow-back")
    assert {k: cli.build_trainer_kwargs(fault_flags)[k] for k in ("spare_workers", "min_workers", "grow_back")} == \
        {"spare_workers": 1, "min_workers": 2, "grow_back": False}


# --- main, with a stand-in Trainer ---------------------------------------------------

class FakeResult:
    state_dict = {"weight": torch.ones(1, 4), "bias": torch.zeros(1)}
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    failures: list = []
    summary = {"steps_per_s": 10.0, "state_bytes_per_worker": 20, "state_bytes_unsharded": 40}


def test_main_runs_the_trainer_and_saves_weights(tmp_path, monkeypatch, capsys):
    calls = {}

    class FakeTrainer:
        def __init__(self, **kwargs):
            calls["kwargs"] = kwargs

        def fit(self, steps):
            calls["steps"] = steps
            return FakeResult()

    monkeypatch.setattr(distopt, "Trainer", FakeTrainer, raising=False)
    out = tmp_path / "run"
    assert cli.main(["train", *CODE, "--steps", "2", "--out", str(out)]) == 0
    assert calls["steps"] == 2 and calls["kwargs"]["out_dir"] == str(out)
    from distopt.checkpoint import read_safetensors
    assert read_safetensors(out / "model.safetensors")["weight"].sum() == 4
    assert "loss 2.0000 -> 1.0000 over 2 steps" in capsys.readouterr().out


def test_main_reports_trainer_validation_as_exit_2(monkeypatch, capsys):
    def refuse(**kwargs):
        raise ValueError("global_batch_size=64 is not divisible by num_workers=3: use a multiple of 3")

    monkeypatch.setattr(distopt, "Trainer", refuse, raising=False)
    assert cli.main(["train", *CODE, "--workers", "3"]) == 2
    assert "use a multiple of 3" in capsys.readouterr().err


def test_main_bad_code_exits_2_before_any_trainer(capsys):
    assert cli.main(["train", *CODE[:4], "--data", "cli_fixture_module:nope"]) == 2
    assert "has no attribute 'nope'" in capsys.readouterr().err


def test_dry_run_prints_the_settings(capsys):
    assert cli.main(["train", *CODE, "--dry-run", "--schedule", "cosine", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "20 steps, 64 samples" in out and "WarmupCosine" in out and "make_model" in out


def test_main_shows_where_user_code_raised(capsys):
    assert cli.main(["train", *CODE[:4], "--data", "cli_fixture_module:needs_an_argument"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "TypeError" in err and "it must take no arguments" in err
