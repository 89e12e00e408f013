"""launch/heap.py: a console script imports the frameworks without full collections, collects again
once they are in, and leaves without the final walk of its heap; called in-process (as tests do),
it leaves the collector as it found it."""
import gc
import subprocess
import sys
import textwrap

from launch import eval_cli, train_cli
from launch.heap import quiet_startup, start_collecting

# Counts the collector's runs by generation from the start of the process, and reports at exit,
# after every atexit handler registered later (the heap's freeze among them).
PROBE = """
import atexit, gc, sys
runs = []
gc.callbacks.append(lambda phase, info: phase == "start" and runs.append(info["generation"]))
atexit.register(lambda: print("full", runs.count(2), "frozen", gc.get_freeze_count(), "enabled", gc.isenabled()))
"""


def probe(main_body: str, decorate: bool) -> dict:
    """Run a main that imports torch and megatron-core (as every rank does) in a fresh interpreter."""
    body = textwrap.indent(textwrap.dedent(main_body).strip(), "    ")
    code = (PROBE + "from launch.heap import quiet_startup, start_collecting\n"
            f"def main():\n{body}\n    return 0\n"
            f"sys.exit({'quiet_startup(main)' if decorate else 'main'}())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    words = out.stdout.split()
    return {"full": int(words[words.index("full") + 1]), "frozen": int(words[words.index("frozen") + 1])}


IMPORTS = """
import megatron.core.parallel_state
start_collecting()
import torch
torch.ones(3).sum()
"""


def test_imports_run_without_full_collections_and_the_heap_is_frozen_at_exit():
    quiet = probe(IMPORTS, decorate=True)
    assert quiet["full"] == 0, quiet
    assert quiet["frozen"] > 100_000, quiet  # the frameworks' objects, out of the final walk
    # The same main undecorated: the imports trigger full collections, nothing is frozen at exit.
    plain = probe(IMPORTS.replace("start_collecting()", "pass"), decorate=False)
    assert plain["full"] >= 1 and plain["frozen"] == 0, plain


def test_in_process_main_leaves_the_collector_as_it_found_it():
    seen = []

    @quiet_startup
    def main():
        seen.append(gc.isenabled())
        start_collecting()
        seen.append((gc.isenabled(), gc.get_freeze_count() > 0))
        return 7

    assert gc.isenabled()
    assert main() == 7 and seen == [False, (True, True)]
    assert gc.isenabled() and gc.get_freeze_count() == 0

    @quiet_startup
    def failing():
        raise ValueError("bad config")

    try:
        failing()
    except ValueError:
        pass
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_the_training_and_evaluation_entries_use_it():
    for main in (train_cli.main, eval_cli.main):
        assert getattr(main, "__wrapped__", None) is not None, main  # functools.wraps of quiet_startup
    assert "start_collecting()" in open(train_cli.__file__).read().split("def launch(")[1].split("\ndef ")[0]
