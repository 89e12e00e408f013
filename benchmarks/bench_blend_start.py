"""Start-up of a blend of 2,000 .bin/.idx prefixes against one of 40, holding the same tokens.

    python benchmarks/bench_blend_start.py [--out DIR] [--documents 40000] [--prefixes 40 2000]
                                           [--runs 1] [--skip-train]

The shipped corpus, tokenized, is repeated to `--documents` documents and cut into 40 and into
2,000 prefixes (46 language names x shards, benchmarks/blend_corpus.py). For each blend:

- data: `build_datasets` + the first global batch (16 samples), in a fresh process that has
  already imported megatron-core, with an empty index cache (cold), then again (warm);
- train: `bloom-train` (python -m launch.train_cli, the tiny model, seq 128) from launch to
  its first step's line (wall, and the process's CPU seconds, which others' work on a shared
  machine moves less), cold cache then warm cache. The blend is a data config file holding
  data.blend (hydra.searchpath + data=blend<N>), as a user would write it.

Prints each time side by side with the ratio 2,000 / 40. Nothing is asserted.
"""
import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIRST_STEP = "iter 1/"
SEQ, SPLIT, BATCH = 128, "969,30,1", 16

DATA_RUN = """
import json, sys, time
import megatron.core.datasets.blended_megatron_dataset_builder, megatron.core.datasets.gpt_dataset
from data.config import DataConfig, DatasetSpec, TokenizerConfig
from data.datasets import build_datasets
spec = json.loads(open(sys.argv[1]).read())
cfg = DataConfig(seq_length=spec["seq"], corpus=[], cache_dir=spec["cache"], split=spec["split"], alpha=1.0,
                 tokenizer=TokenizerConfig(path=spec["tokenizer"]),
                 blend=[DatasetSpec(b["name"], b["prefix"]) for b in spec["blend"]])
start = time.perf_counter()
splits = build_datasets(cfg, spec["train"], spec["valid"], 0)
built = time.perf_counter()
batch = [splits.train[i] for i in range(spec["batch"])]
print(json.dumps({"build": built - start, "first_batch": time.perf_counter() - built,
                  "languages": len(splits.valid_per_dataset)}))
"""


def prepare(out: Path, documents: int, counts: list[int]) -> tuple[str, dict]:
    """The tokenizer directory and {prefixes: blend list}, written under `out` once."""
    import numpy as np

    from benchmarks.blend_corpus import repeated, source_documents, write_blend
    from data.config import DataConfig
    from data.distributed import ensure_process_group
    from data.prepare import prepare_data

    ensure_process_group()
    prepared = prepare_data(DataConfig(cache_dir=str(out / "corpus_cache")))
    blends, docs = {}, None
    for count in counts:
        listing = out / f"blend{count}" / "blend.json"
        if not listing.is_file():
            docs = docs or repeated(source_documents(prepared.processed_dir), documents)
            listing.parent.mkdir(parents=True, exist_ok=True)
            listing.write_text(json.dumps(write_blend(docs, listing.parent, count, np.uint16)))
        blends[count] = json.loads(listing.read_text())
        _write_data_config(out, count, blends[count], prepared.tokenizer_dir)
    return str(prepared.tokenizer_dir), blends


def _write_data_config(out: Path, count: int, blend: list, tokenizer: Path) -> None:
    import yaml

    folder = out / "conf" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    common = {"defaults": ["demo", "_self_"], "corpus": [], "alpha": 1.0, "split": SPLIT,
              "tokenizer": {"path": str(tokenizer)}}
    (folder / f"blend{count}.yaml").write_text(yaml.safe_dump({**common, "blend": blend}))


def time_data(out: Path, tokenizer: str, blend: list, count: int) -> dict:
    cache = out / f"data_cache{count}"
    shutil.rmtree(cache, ignore_errors=True)
    spec = {"seq": SEQ, "split": SPLIT, "cache": str(cache), "tokenizer": tokenizer, "blend": blend,
            "train": BATCH * 300, "valid": BATCH * 4 * 4, "batch": BATCH}
    spec_file = out / f"data_spec{count}.json"
    spec_file.write_text(json.dumps(spec))
    times = {}
    for state in ("cold", "warm"):
        done = subprocess.run([sys.executable, "-c", DATA_RUN, str(spec_file)], cwd=ROOT, capture_output=True,
                              text=True, timeout=900)
        if done.returncode != 0:
            raise SystemExit(f"data run failed ({count} prefixes, {state}):\n{done.stderr[-3000:]}")
        times[state] = json.loads(done.stdout.strip().splitlines()[-1])
    return times


# Lines bloom-train prints on the way (the "data:" one since the index-cache rework).
MARKS = {"placement": "placement:", "data": "data: index caches", "trainer": "training bloom-", "first_step": FIRST_STEP}
LAPS = (("  launch -> config loaded, group up", None, "placement"),
        ("  config loaded -> datasets built", "placement", "data"),
        ("  config loaded -> model, engine ready", "placement", "trainer"),
        ("  engine ready -> first step", "trainer", "first_step"))


def time_train(out: Path, count: int, state: str) -> dict:
    """Seconds from launching bloom-train to each of MARKS' lines: the config loaded and the
    process group up (placement), the datasets built (data), data + model + engine ready
    (trainer), the first step."""
    cache = out / f"train_cache{count}"
    if state == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    run_dir = tempfile.mkdtemp(prefix="bench_blend_run_")
    command = [sys.executable, "-m", "launch.train_cli", f"hydra.searchpath=[file://{out / 'conf'}]",
               f"data=blend{count}", f"data.cache_dir={cache}",
               f"trainer.run_dir={run_dir}", "trainer.train_iters=2", "trainer.resume=none",
               "logging.tensorboard=false"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen, tail = {}, []
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        for mark, text in MARKS.items():
            if text in line and mark not in seen:
                seen[mark] = time.perf_counter() - start
        if "first_step" in seen:
            os.killpg(proc.pid, signal.SIGKILL)  # now: a SIGTERM would save a checkpoint first
            break
    proc.wait(timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds up to the first step: less moved than wall time by others' work on the machine
    seen["cpu"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    shutil.rmtree(run_dir, ignore_errors=True)
    if "first_step" not in seen:
        print("".join(tail), file=sys.stderr)
    return seen


def _row(label: str, few: float | None, many: float | None) -> str:
    ratio = f"{many / few:5.2f}x" if few and many else "  n/a"
    text = lambda v: f"{v:8.2f} s" if v is not None else "   never "
    return f"  {label:42} {text(few)}  {text(many)}  {ratio}"


def header() -> str:
    """Date, machine and command, for the measurement file."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return (f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores ({model}), "
            f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
            f"$ python {' '.join(sys.argv)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "bench_blend_start"))
    parser.add_argument("--documents", type=int, default=40000)
    parser.add_argument("--prefixes", type=int, nargs=2, default=[40, 2000])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--skip-train", action="store_true", help="only the data measurement")
    args = parser.parse_args()
    out = Path(args.out)
    few, many = args.prefixes
    print(header(), flush=True)
    tokenizer, blends = prepare(out, args.documents, [few, many])
    print(f"blends: {few} and {many} prefixes over the same {args.documents} documents, seq {SEQ}, split {SPLIT}")
    firsts = {}  # (state, prefixes) -> [seconds to the first step, per run]
    for run in range(args.runs):
        print(f"run {run + 1}:  {'':32} {few:>6} pfx  {many:>6} pfx  ratio", flush=True)
        data = {count: time_data(out, tokenizer, blends[count], count) for count in (few, many)}
        for state in ("cold", "warm"):
            for part in ("build", "first_batch"):
                print(_row(f"build_datasets {part} ({state} cache)", data[few][state][part], data[many][state][part]))
        print(f"  per-language validation sets: {data[few]['warm']['languages']} and {data[many]['warm']['languages']}")
        if args.skip_train:
            continue
        for state in ("cold", "warm"):
            times = {count: time_train(out, count, state) for count in (few, many)}
            for count in (few, many):
                firsts.setdefault((state, count), []).append(times[count].get("first_step"))
                firsts.setdefault((f"{state} cpu", count), []).append(times[count].get("cpu"))
            print(_row(f"bloom-train launch -> first step ({state})", times[few].get("first_step"),
                       times[many].get("first_step")))
            print(_row(f"  CPU time of it, user+sys ({state})", times[few].get("cpu"), times[many].get("cpu")))
            for label, a, b in LAPS:
                lap = {c: times[c][b] - (times[c][a] if a else 0) if b in times[c] and (a is None or a in times[c])
                       else None for c in (few, many)}
                print(_row(f"{label} ({state})", lap[few], lap[many]), flush=True)
    if firsts:
        print(f"median of {args.runs} run(s):")
        median = lambda xs: sorted(xs)[len(xs) // 2] if None not in xs else None
        for state in ("cold", "warm"):
            print(_row(f"bloom-train launch -> first step ({state})", median(firsts[(state, few)]),
                       median(firsts[(state, many)])))
            print(_row(f"  CPU time of it, user+sys ({state})", median(firsts[(f"{state} cpu", few)]),
                       median(firsts[(f"{state} cpu", many)])))


if __name__ == "__main__":
    main()
