"""Every config value is checked before anything starts, from one place (issue 20, item 4).

Each numeric or enumerated field declares its allowed range or values beside it (schema.py,
data/config.py: metadata=at_least(1), one_of(...), ...); training/config/checks.py's
check_declared walks the config in validate, which bloom-train runs before it starts a process,
creates the run dir or builds an engine. The walk here goes over the schema's types (nested
dataclasses, list items and dict values too), tries an out-of-range value for every declared key
through bloom-train, and fails on a numeric or text key that declares nothing and is not on
NO_RANGE below.
"""
import dataclasses
import re
import sys
import types
import typing

import pytest

from data.config import ALLOWED, DataConfig
from launch import slurm, train_cli
from training.config.checks import check_declared, validate
from training.config.loader import load_config
from training.config.schema import RootConfig

# Keys with no range of their own: names, paths, or values another check owns (each says which).
NO_RANGE = {
    "model.name": "a label for plans and logs",
    "data.corpus": "paths the data pipeline reads",
    "data.text_key": "a field name of the corpus records",
    "data.lang_key": "a field name of the corpus records",
    "data.cache_dir": "a directory, created when missing",
    "data.tokenizer.path": "a tokenizer directory (unset: one is trained)",
    "data.tokenizer.seed": "any integer: it seeds Python's random.Random",
    "data.blend[0].name": "a dataset name",
    "data.blend[0].prefix": "a .bin/.idx path prefix",
    "trainer.rampup_batch_size": "[start, increment, samples]: checks.batch_schedule, against the global batch",
    "trainer.run_dir": "a directory the run creates",
    "trainer.kill_switch_file": "a file that appears later to stop the run",
    "trainer.skip_train_iteration_range": "START-END strings: training.spikes.SkipRanges.parse, in validate",
    "trainer.eval_tasks.tasks": "lm_eval task names: check_eval_tasks, before any rank starts",
    "trainer.eval_tasks.include_path": "a folder of task YAMLs: check_eval_tasks",
    "logging.wandb_project": "a W&B project name",
    "launcher.gpu_type": "a hardware-catalogue entry or YAML file: load_gpu, in validate",
    "launcher.partition": "a SLURM partition name",
    "launcher.account": "a SLURM account name",
}

# Keys declared by a rule (a format or a path) rather than a bound or a list: a value it refuses.
RULE_REFUSES = {
    "trainer.resume": "/no/such/path",
    "data.split": "0,0,0",
    "launcher.time": "tomorrow",
}


@dataclasses.dataclass
class Leaf:
    key: str  # as the error names it: trainer.spike.window, data.blend[0].weight, data.weights.x
    type: type  # int, float, str or bool (unwrapped from Optional, List, Dict)
    allowed: object  # the declaration (data.config.Allowed) or None
    override: typing.Callable[[str], str]  # a value's text -> the Hydra override setting it

    def texts(self, value):
        """(the override's value, as the error shows it)."""
        if self.type is str:
            return f"'{value}'", str(value)
        value = self.type(value)
        return repr(value), str(value)


def _unwrap(hint):
    """(the scalar or dataclass type, 'list' | 'dict' | None)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return _unwrap(args[0])
    if origin is list:
        return args[0], "list"
    if origin is dict:
        return args[1], "dict"
    return hint, None


def leaves(cls=RootConfig, prefix="", outer=None):
    """Every leaf field of the schema, walked by type; `outer` builds the override of a field
    inside a list's item (data.blend=[{name:x,weight:V}])."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        kind, container = _unwrap(hints[spec.name])
        key = prefix + spec.name
        if dataclasses.is_dataclass(kind):
            if container == "list":
                required = [f"{f.name}:x" for f in dataclasses.fields(kind) if f.default == "???"]

                def item(name, listed=key, required=required):
                    return lambda text: f"{listed}=[{{{','.join(required + [f'{name}:{text}'])}}}]"
                yield from leaves(kind, key + "[0].", item)
            else:
                yield from leaves(kind, key + ".", outer)
            continue
        allowed = spec.metadata.get(ALLOWED)
        if outer is not None:
            yield Leaf(key, kind, allowed, outer(spec.name))
        elif container == "list":
            yield Leaf(f"{key}[0]", kind, allowed, lambda text, key=key: f"{key}=[{text}]")
        elif container == "dict":
            yield Leaf(f"{key}.x", kind, allowed, lambda text, key=key: f"+{key}.x={text}")
        else:
            yield Leaf(key, kind, allowed, lambda text, key=key: f"{key}={text}")


LEAVES = list(leaves())
DECLARED = [leaf for leaf in LEAVES if leaf.allowed is not None]


def schema_key(leaf: Leaf) -> str:
    """The field's key without the list index or dict name the walk gave it (for NO_RANGE)."""
    return leaf.key.removesuffix("[0]").removesuffix(".x")


def refused_values(leaf: Leaf) -> list:
    """Values just outside what the declaration allows: each bound's neighbour, a choice that is
    not one, or the rule's known refusal."""
    allowed = leaf.allowed
    if allowed.values:
        return ["bogus"] if leaf.type is str else [max(allowed.values) + 1]
    if allowed.rule is not None:
        return [RULE_REFUSES[leaf.key]]
    values = []
    if allowed.low is not None:
        values.append(allowed.low if allowed.low_open else allowed.low - 1)
    if allowed.high is not None:
        values.append(allowed.high if allowed.high_open else allowed.high + 1)
    return values


CASES = [(leaf, value) for leaf in DECLARED for value in refused_values(leaf)]


@pytest.fixture
def started(monkeypatch):
    """What bloom-train started: the training run, the local processes or the dry run's plan
    (stand-ins record the call, so a value let through fails fast instead of training)."""
    calls = []
    monkeypatch.setattr(train_cli, "relaunch_with_torchrun", lambda *a, **k: calls.append("processes") or 0)
    monkeypatch.setattr(train_cli, "dry_run", lambda cfg: calls.append("dry run") or 0)
    stub = types.ModuleType("training.train")
    stub.run = lambda cfg: calls.append("training") or 0
    monkeypatch.setitem(sys.modules, "training.train", stub)
    return calls


def assert_refused_before_start(code, capfd, run_dir, started, named, prog="bloom-train"):
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert started == [], f"{named} let through: {started} started"
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), captured.err
    # the key and the value, whole (trainer.seed=4294967296 is not trainer.seed=42)
    assert re.search(rf"(^|\s){re.escape(named)}(\s|:|$)", lines[0].removeprefix(f"{prog}: error: ")), lines[0]
    assert captured.out == ""
    assert not run_dir.exists()  # no run dir, so no checkpoint, metrics or plan either


def test_the_walk_reaches_every_config_including_data():
    keys = {leaf.key for leaf in LEAVES}
    assert {"trainer.spike.window", "trainer.eval_tasks.interval", "data.tokenizer.alpha",
            "data.blend[0].weight", "data.weights.x", "trainer.spike.inject_at[0]"} <= keys
    data_keys = {f"data.{leaf.key}" for leaf in leaves(DataConfig)}
    assert data_keys <= keys


def test_every_numeric_and_text_key_declares_its_values_or_is_listed():
    """A new int, float or str key (or a list or dict of them) without a declaration fails here,
    unless it is added to NO_RANGE with the reason it has no range."""
    undeclared = {schema_key(leaf) for leaf in LEAVES if leaf.type in (int, float, str) and leaf.allowed is None}
    assert undeclared - set(NO_RANGE) == set(), "declare a range or values (data/config.py's helpers)"
    assert set(NO_RANGE) - undeclared == set(), "NO_RANGE names a key that is declared or gone"
    assert set(RULE_REFUSES) == {leaf.key for leaf in DECLARED if leaf.allowed.rule is not None}


def test_defaults_and_shipped_configs_are_in_range():
    check_declared(RootConfig())
    for experiment in ("bloom-560m", "bloom-176b"):
        check_declared(load_config([f"experiment={experiment}", "launcher=slurm", "data=bloom"]))
    check_declared(load_config(["data=demo_weighted"]))


@pytest.mark.parametrize("leaf, value", CASES, ids=[f"{leaf.key}={value}" for leaf, value in CASES])
def test_out_of_range_value_is_one_line_and_nothing_starts(leaf, value, tmp_path, capfd, started):
    text, shown = leaf.texts(value)
    run_dir = tmp_path / "run"
    code = train_cli.main([leaf.override(text), f"trainer.run_dir={run_dir}"])
    assert_refused_before_start(code, capfd, run_dir, started, f"{leaf.key}={shown}")


# -- the examples, on every path bloom-train and bloom-slurm take ---------------------

EXAMPLES = {"trainer.save_interval=0": "trainer.save_interval=0",
            "trainer.eval_interval=0": "trainer.eval_interval=0",
            "trainer.resume=/no/such/path": "trainer.resume=/no/such/path",
            # owned by checks beside the declarations, run at the same point
            "trainer.skip_train_iteration_range=[9-8]": "'9-8'",
            "launcher.gpu_type=B300": "launcher.gpu_type=B300",
            "trainer.rampup_batch_size=[8,3,100]": "trainer.rampup_batch_size=[8, 3, 100]",
            "trainer.spike.min_history=101": "trainer.spike.min_history=101"}
TORCHRUN = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}
PATHS = {"by hand": [], "dry run": ["trainer.dry_run=true"], "local processes": ["launcher.nproc_per_node=2"],
         "under torchrun": []}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_examples_refused_before_start_on_every_path(example, path, tmp_path, capfd, monkeypatch, started):
    if path == "under torchrun":
        for name, value in TORCHRUN.items():
            monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    code = train_cli.main([example, *PATHS[path], f"trainer.run_dir={run_dir}"])
    assert_refused_before_start(code, capfd, run_dir, started, EXAMPLES[example])


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_examples_refused_by_bloom_slurm(example, tmp_path, capfd):
    run_dir = tmp_path / "run"
    # one GPU: the demo's batch of 16 does not split over the 8 of launcher=slurm's node
    code = slurm.main([example, "launcher=slurm", "launcher.gpus_per_node=1", f"trainer.run_dir={run_dir}"])
    assert_refused_before_start(code, capfd, run_dir, [], EXAMPLES[example], prog="bloom-slurm")


def test_resume_keywords_and_existing_directories_are_accepted(tmp_path):
    for resume in ("auto", "none", str(tmp_path)):
        validate(load_config([f"trainer.resume={resume}"]), 1)
