"""``distopt train``: parsing, --config merge, user-code resolution, optimizer set-up. No Ray."""
from __future__ import annotations

import importlib
import inspect
import sys
import textwrap

import pytest
import torch

import cli_fixture_module as fixture
import distopt
from distopt import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from distopt.optim.rules import SGD, Adam
from distopt.runtime.groups import GROUPS, toml_fields
from distopt.optim.schedules import Constant, WarmupCosine
from launch import cli
from launch.inputs import UsageError, resolve
from launch.options import TRAINER_KEYS

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

def test_defaults_are_the_groups_own():
    kwargs = cli.build_trainer_kwargs(parse())
    assert (kwargs["global_batch_size"], kwargs["optimizer"].lr) == (64, 1e-3)
    for table, cls in GROUPS.items():
        assert kwargs[table] == cls()  # nothing given: the group's defaults, written there only
    assert not {"zero_stage", "seed", "eval_every"} & set(kwargs)  # the Trainer's defaults apply


def test_every_flag_parses():
    args = parse("--scaling.num_workers", "8", "--scaling.use_gpu", "--scaling.cpus_per_worker", "2",
                 "--zero_stage", "2", "--steps", "50", "--optimizer.name", "sgd", "--optimizer.lr", "0.1",
                 "--optimizer.momentum", "0.9", "--optimizer.weight_decay", "1e-4", "--optimizer.warmup_steps", "5",
                 "--optimizer.schedule", "cosine", "--optimizer.min_lr", "0.01", "--global_batch_size", "32",
                 "--gradient_accumulation_steps", "2", "--max_grad_norm", "1.0", "--seed", "3",
                 "--scaling.ray_address", "auto", "--run.out_dir", "runs/x", "--run.log_every", "5",
                 "--no-run.progress", "--scaling.placement_strategy", "SPREAD", "--failure.max_failures", "1",
                 "--checkpoint.dir", "ck", "--checkpoint.every", "10", "--run.callbacks", "tensorboard", "m:cb")
    kwargs = cli.build_trainer_kwargs(args)
    assert kwargs["scaling"] == ScalingConfig(num_workers=8, use_gpu=True, cpus_per_worker=2.0,
                                              ray_address="auto", placement_strategy="SPREAD")
    assert kwargs["failure"] == FailureConfig(max_failures=1)
    assert kwargs["checkpoint"] == CheckpointConfig(dir="ck", every=10)
    assert kwargs["run"] == RunConfig(out_dir="runs/x", log_every=5, progress=False, callbacks=("tensorboard", "m:cb"))
    assert (kwargs["zero_stage"], kwargs["gradient_accumulation_steps"], kwargs["max_grad_norm"]) == (2, 2, 1.0)
    assert isinstance(kwargs["optimizer"], SGD) and kwargs["optimizer"].momentum == 0.9


def test_missing_code_names_the_flags(capsys):
    err = exit_message(capsys, ["train", "--model", "m:f"])
    assert "missing --loss, --data" in err and "--config" in err


@pytest.mark.parametrize("flags, expected", [
    (["--scaling.num_workers", "two"], "argument --scaling.num_workers: 'two' is not an int"),
    (["--optimizer.lr", "fast"], "argument --optimizer.lr: 'fast' is not a number"),
    (["--scaling.placement_strategy", "pack"], "invalid choice: 'pack'"),
    (["--workers", "2"], "unrecognized arguments: --workers"),
])
def test_bad_flags_exit_2(capsys, flags, expected):
    assert expected in exit_message(capsys, ["train", *CODE, *flags])


@pytest.mark.parametrize("flags, expected", [
    (["--scaling.num_workers", "0"], "ScalingConfig.num_workers=0 must be an int >= 1 (--scaling.<field>"),
    (["--failure.collective_timeout_s", "0"], "FailureConfig.collective_timeout_s=0.0 must be > 0 seconds"),
    (["--checkpoint.every", "5"], "CheckpointConfig.every=5 needs a dir to write to"),
    (["--run.callbacks", "wandb"], "RunConfig.callbacks[0]='wandb' must be one of"),
])
def test_bad_group_values_name_the_field_before_ray(flags, expected):
    with pytest.raises(UsageError) as info:
        cli.build_trainer_kwargs(parse(*flags))
    assert expected in str(info.value)


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
        max_grad_norm = 1
        [optimizer]
        lr = 3e-4
        schedule = "cosine"
        warmup_steps = 10
        [scaling]
        num_workers = 4
        [run]
        progress = false
    """)
    kwargs = cli.build_trainer_kwargs(cli.parse_args(["train", "--config", path, "--scaling.num_workers", "8"]))
    assert kwargs["scaling"].num_workers == 8  # the command line wins
    assert kwargs["optimizer"].lr == WarmupCosine(3e-4, 1000, 10, 0.0)
    assert kwargs["max_grad_norm"] == 1.0 and isinstance(kwargs["max_grad_norm"], float)
    assert kwargs["run"].progress is False and len(kwargs["data"]) == 64


@pytest.mark.parametrize("text, expected", [
    ("global_batch = 64", "unknown key 'global_batch' (did you mean 'global_batch_size'?)"),
    ("[scaling]\nnum_wrokers = 2", "unknown key 'num_wrokers' in [scaling] (did you mean 'num_workers'?)"),
    ("[scalling]\nnum_workers = 2", "unknown table [scalling] (did you mean 'scaling'?)"),
    ("scaling = 2", "scaling must be a table"),
    ("[scaling]\nnum_workers = 2.5", "[scaling] num_workers = 2.5: '2.5' is not an int"),
    ("[scaling]\nnum_workers = true", "must be a single number"),
    ("[optimizer]\nname = 'lamb'", "is not one of adam, sgd"),
    ("model = 3", "must be a string: write model = \"3\""),
    ("[run]\nprogress = 'yes'", "must be true or false"),
    ("[run]\ncallbacks = 'tensorboard'", "must be a list of strings"),
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
    rule = cli.build_optimizer(parse("--optimizer.lr", "0.01"))
    assert isinstance(rule, Adam) and rule.lr == 0.01 and not rule.decoupled


def test_warmup_and_cosine_build_schedules():
    assert cli.build_optimizer(parse("--optimizer.warmup_steps", "10")).lr == Constant(1e-3, 10)
    rule = cli.build_optimizer(parse("--optimizer.schedule", "cosine", "--steps", "200", "--optimizer.warmup_steps",
                                     "20", "--optimizer.min_lr", "1e-5", "--optimizer.weight_decay", "0.1"))
    assert rule.lr == WarmupCosine(1e-3, 200, 20, 1e-5)  # decays over the whole run
    assert rule.decoupled and rule.weight_decay == 0.1  # --weight-decay with adam is AdamW


def test_sgd_with_momentum():
    rule = cli.build_optimizer(parse("--optimizer.name", "sgd", "--optimizer.lr", "0.1", "--optimizer.momentum", "0.9"))
    assert isinstance(rule, SGD) and (rule.lr, rule.momentum) == (0.1, 0.9)


@pytest.mark.parametrize("flags, expected", [
    (["--optimizer.momentum", "0.9"], "momentum applies to name = \"sgd\""),
    (["--optimizer.schedule", "cosine", "--steps", "10", "--optimizer.warmup_steps", "10"],
     "use warmup_steps < total_steps"),
    (["--optimizer.min_lr", "0.1"], "only applies to the cosine schedule"),
])
def test_options_that_do_not_fit_together(flags, expected):
    with pytest.raises(UsageError, match=expected):
        cli.build_trainer_kwargs(parse(*flags))


def test_every_group_field_has_a_flag_and_a_toml_key():
    flags = {a.dest for a in cli.build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    for table, cls in GROUPS.items():
        assert {f"{table}.{f.name}" for f in toml_fields(cls)} <= flags
    assert set(TRAINER_KEYS) <= flags
    trainer_args = set(inspect.signature(distopt.Trainer).parameters)
    assert set(TRAINER_KEYS) | {"model", "loss", "data", "eval_data", "eval_fn", "param_groups", "optimizer",
                                "global_batch_size",
                                *GROUPS} == trainer_args


def test_eval_options_resolve_user_code():
    kwargs = cli.build_trainer_kwargs(parse("--eval_data", "cli_fixture_module:make_dataset", "--eval_every", "5",
                                            "--eval_fn", "cli_fixture_module:loss"))
    assert len(kwargs["eval_data"]) == 64 and kwargs["eval_every"] == 5 and kwargs["eval_fn"] is fixture.loss


def test_dry_run_toml_reads_back_to_the_same_run(capsys, tmp_path):
    flags = ["--scaling.num_workers", "4", "--failure.max_failures", "1", "--checkpoint.dir", "ck",
             "--run.callbacks", "tensorboard", "--optimizer.lr", "0.01", "--scaling.grad_wire_dtype", "bfloat16"]
    assert cli.main(["train", *CODE, *flags, "--dry-run"]) == 0
    text = capsys.readouterr().out
    path = write(tmp_path, text)
    again = cli.build_trainer_kwargs(cli.parse_args(["train", "--config", path]))
    first = cli.build_trainer_kwargs(parse(*flags))
    for key in ("scaling", "failure", "checkpoint", "run", "global_batch_size"):
        assert again[key] == first[key]
    assert again["scaling"].grad_wire_dtype is torch.bfloat16 and again["optimizer"].lr == 0.01
    assert cli.main(["train", "--config", path, "--dry-run"]) == 0
    assert capsys.readouterr().out == text


@pytest.mark.parametrize("group", [
    ScalingConfig(num_workers=8, use_gpu=True, cpus_per_worker=0.5, placement_strategy="STRICT_SPREAD",
                  ray_address="ray://head:10001", grad_wire_dtype=torch.float16),
    FailureConfig(max_failures=5, spare_workers=2, min_workers=3, grow_back=False, shared_memory=False,
                  replica_log_depth=2, collective_timeout_s=9.5),
    CheckpointConfig(dir="/shared/ck", every=100, keep_last=1, resume_from="/shared/ck/step-100"),
    RunConfig(out_dir="runs/x", log_every=0, progress=True, callbacks=["tensorboard", "mod:cb"]),
])
def test_config_groups_round_trip_through_toml(group):
    import tomllib

    import tomli_w
    table = tomllib.loads(tomli_w.dumps({"t": group.to_dict()}))["t"]
    assert type(group).from_dict(table) == group


def test_callback_objects_have_no_toml_form():
    with pytest.raises(ValueError, match="name them as 'pkg.module:attribute'"):
        RunConfig(callbacks=[distopt.Callback()]).to_dict()
    with pytest.raises(ValueError, match="unknown key 'workers' for ScalingConfig"):
        ScalingConfig.from_dict({"workers": 2})


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
    assert cli.main(["train", *CODE, "--steps", "2", "--run.out_dir", str(out)]) == 0
    assert calls["steps"] == 2 and calls["kwargs"]["run"].out_dir == str(out)
    from distopt.checkpoint import read_safetensors
    assert read_safetensors(out / "model.safetensors")["weight"].sum() == 4
    assert "loss 2.0000 -> 1.0000 over 2 steps" in capsys.readouterr().out


def test_main_reports_trainer_validation_as_exit_2(monkeypatch, capsys):
    def refuse(**kwargs):
        raise ValueError("global_batch_size=64 is not divisible by num_workers=3: use a multiple of 3")

    monkeypatch.setattr(distopt, "Trainer", refuse, raising=False)
    assert cli.main(["train", *CODE, "--scaling.num_workers", "3"]) == 2
    assert "use a multiple of 3" in capsys.readouterr().err


def test_main_bad_code_exits_2_before_any_trainer(capsys):
    assert cli.main(["train", *CODE[:4], "--data", "cli_fixture_module:nope"]) == 2
    assert "has no attribute 'nope'" in capsys.readouterr().err


def test_dry_run_prints_the_settings(capsys):
    assert cli.main(["train", *CODE, "--dry-run", "--optimizer.schedule", "cosine", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "20 steps, 64 samples" in out and 'schedule = "cosine"' in out and "make_model" in out
    assert "[scaling]\nnum_workers = 2" in out


def test_main_shows_where_user_code_raised(capsys):
    assert cli.main(["train", *CODE[:4], "--data", "cli_fixture_module:needs_an_argument"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "TypeError" in err and "it must take no arguments" in err


def test_param_groups_name_the_usual_splits_and_code():
    from distopt.optim import decay_groups, muon_groups
    assert cli.build_trainer_kwargs(parse("--param_groups", "decay"))["param_groups"] is decay_groups
    hybrid = cli.build_trainer_kwargs(parse("--param_groups", "muon", "--optimizer.muon_lr", "0.01"))["param_groups"]
    assert hybrid.func is muon_groups and hybrid.keywords["rule"].lr == 0.01
    named = cli.build_trainer_kwargs(parse("--param_groups", "cli_fixture_module:loss"))["param_groups"]
    assert named is fixture.loss
    assert "param_groups" not in cli.build_trainer_kwargs(parse())
    with pytest.raises(UsageError, match="use one of decay, muon"):
        cli.build_trainer_kwargs(parse("--param_groups", "adamw"))


def test_param_groups_and_muon_from_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('param_groups = "muon"\n[optimizer]\nname = "adam"\nmuon_lr = 0.03\nweight_decay = 0.1\n')
    kwargs = cli.build_trainer_kwargs(parse("--config", str(path)))
    assert kwargs["param_groups"].keywords["rule"].lr == 0.03 and kwargs["optimizer"].decoupled
    assert cli.build_optimizer(parse("--optimizer.name", "muon")).name == "muon"


def test_data_may_be_a_stream_or_shards(tmp_path):
    from torch.utils.data import IterableDataset
    kwargs = cli.build_trainer_kwargs(parse("--data", "cli_fixture_module:stream"))
    assert isinstance(kwargs["data"], IterableDataset)
    with pytest.raises(UsageError, match="map-style dataset"):  # evaluation takes map-style data only
        cli.build_trainer_kwargs(parse("--eval_data", "cli_fixture_module:stream"))
