"""`<script> --help` and `-h` for every console script in setup.py (read from it, so a new script
is covered without editing this file): exit status 0, a `usage: <script>` line, a `<script>: ...`
line saying what it does, and an `Examples:` section with at least one line `  <script> ARGS`;
and the help imports none of torch, megatron-core, DeepSpeed or transformers.

Each script is the installed console script itself, run in a subprocess by a wrapper that prints
which frameworks ended up in sys.modules. bloom-train's help also lists every config group with its
options as configs/ holds them, and every key it names is a field of the schema
(training/config/schema.py, data/config.py).
"""
import functools
import json
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "megatron.core", "deepspeed", "transformers")
MARK = "FRAMEWORKS_IMPORTED="

# Runs a console script file as `python <script> <flag>` would, then reports the frameworks it loaded.
WRAPPER = f"""
import json, runpy, sys
script, flag = sys.argv[1], sys.argv[2]
sys.argv = [script, flag]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as stop:
    code = stop.code
sys.stdout.flush()
sys.stderr.write("\\n{MARK}" + json.dumps([m for m in {FRAMEWORKS!r} if m in sys.modules]) + "\\n")
sys.exit(code)
"""


def console_scripts() -> dict:
    block = re.search(r'"console_scripts"\s*:\s*\[(.*?)\]', (REPO / "setup.py").read_text(), re.S).group(1)
    return dict(re.findall(r'"([\w-]+)\s*=\s*([\w.]+:\w+)"', block))


SCRIPTS = sorted(console_scripts())


@functools.cache
def help_run(name: str, flag: str):
    script = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert script, f"{name} is not installed next to {sys.executable}: pip install -e ."
    run = subprocess.run([sys.executable, "-c", WRAPPER, script, flag], capture_output=True, text=True,
                         timeout=120, cwd=REPO.parent)
    report = [line for line in run.stderr.splitlines() if line.startswith(MARK)]
    frameworks = json.loads(report[-1][len(MARK):]) if report else None
    return run.returncode, run.stdout, run.stderr, frameworks


def section(text: str, header: str) -> list:
    """The lines after the line starting with `header`, up to the next blank line."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    assert start is not None, f"no {header!r} section in:\n{text}"
    body = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        body.append(line)
    return body


def test_setup_py_is_read():
    assert {"bloom-train", "bloom-plan", "bloom-preprocess"} <= set(SCRIPTS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, flag):
    code, out, err, frameworks = help_run(name, flag)
    assert code == 0, f"{name} {flag} exited {code}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert re.search(rf"^usage: {re.escape(name)}\b", out, re.M), f"{name} {flag}: no `usage: {name}` line"
    assert re.search(rf"^{re.escape(name)}: \S", out, re.M), f"{name} {flag}: no `{name}: what it does` line"
    examples = [line for line in section(out, "Examples:") if re.match(rf"  {re.escape(name)} +\S", line)]
    assert examples, f"{name} {flag}: no example line `  {name} ARGS` under `Examples:`"
    assert frameworks == [], f"{name} {flag} imported {frameworks} (lazy-import them where they are used)"


def _unwrap(tp):
    """Optional[X] -> X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def schema_key(key: str) -> str:
    """'' when `key` (a.b.c, +a.b.NAME for a dict entry) is a field of RootConfig, else why not."""
    from training.config.schema import RootConfig

    new_entry = key.startswith("+")
    parts = key.lstrip("+").split(".")
    node = RootConfig
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(node) if isinstance(node, type) else {}
        if part not in hints:
            return f"{key}: {'.'.join(parts[:i + 1])} is not in the schema"
        node = _unwrap(hints[part])
        if typing.get_origin(node) is dict:  # data.weights: the next part is the user's name
            if len(parts) != i + 2 or not parts[-1].isupper() or not new_entry:
                return f"{key}: a dict entry is written +{'.'.join(parts[:i + 1])}.NAME=..."
            return ""
    return f"{key}: `+` adds a key; this one exists" if new_entry else ""


def test_train_help_keys_are_schema_fields():
    code, out, _, _ = help_run("bloom-train", "--help")
    assert code == 0
    keys = [m.group(1) for line in section(out, "Most used keys")
            if (m := re.match(r"  (\+?[a-z_][\w.]*)=", line))]
    for wanted in ("parallel.tp", "parallel.pp", "parallel.zero_stage", "trainer.micro_batch_size",
                   "trainer.global_batch_size", "trainer.train_iters", "trainer.precision", "trainer.run_dir",
                   "trainer.resume", "trainer.save_interval", "launcher.nproc_per_node"):
        assert wanted in keys, f"bloom-train --help does not list {wanted}"
    problems = [why for key in keys if (why := schema_key(key))]
    assert not problems, problems


def test_train_help_lists_the_config_groups():
    code, out, _, _ = help_run("bloom-train", "--help")
    assert code == 0
    listed = {}
    for line in section(out, "Config groups"):
        group, _, options = re.sub(r"\(.*?\)", "", line).strip().partition("= ")  # "(none by default)"
        listed[group] = {o.rstrip("*") for o in options.split()}
    configs = REPO / "configs"
    expected = {d.name: {p.stem for p in d.glob("*.yaml")} for d in configs.iterdir()
                if d.is_dir() and d.name != "hardware" and any(d.glob("*.yaml"))}
    assert listed == expected
    assert {"model", "parallel", "data", "optim", "trainer", "logging", "launcher", "experiment"} <= set(listed)


def test_schema_key_refuses():
    assert schema_key("trainer.micro_batch_size") == ""
    assert schema_key("+data.weights.NAME") == ""
    assert schema_key("trainer.micro_batch") != ""
    assert schema_key("data.weights.NAME") != ""  # Hydra needs the + for a new dict entry
    assert schema_key("trainer.run_dir.x") != ""
