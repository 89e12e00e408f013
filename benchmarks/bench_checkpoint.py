"""Checkpoint save and load throughput against this disk's own sequential rates, and the save's
extra peak memory per rank, at DP 1, 2 and 4 (CPU, gloo), side by side in one run; and with
trainer.async_save, the training time lost per save next to the host copy and the synchronous save.

    python benchmarks/bench_checkpoint.py [--hidden 768] [--layers 4] [--heads 12]
                                          [--dp 1 2 4] [--disk-mb 512] [--dir PATH]
                                          [--async-rounds 2] [--async-steps 3] [--max-async-steps 20]

First the disk under --dir (default: a temporary directory under the current directory; not
/dev/shm) is measured: one sequential write of --disk-mb MB in 4 MiB blocks ending with fsync,
then the same file read back after posix_fadvise(POSIX_FADV_DONTNEED) has dropped its pages from
the page cache (and, for comparison, read once more from the cache). Where the drop does not work
(some filesystems ignore it) the "disk" read rate is a cache rate: the cached rate printed beside it
shows which.

Then, for each DP size (one launch of real gloo processes each, TP = PP = 1, ZeRO-1, fp32), the
demo BLOOM widened by --hidden/--layers/--heads takes one optimizer step (so Adam's moments exist:
the checkpoint is 12 bytes per parameter, fp32 master + two moments, plus RNG and small files),
then every rank times Checkpointer.save() and, after the checkpoint's pages are dropped from the
cache the same way, Checkpointer.load() of it. Printed per DP:

  - total MB: the manifest's bytes; per-rank MB: the bytes of the files each rank wrote (its
    fragment files and RNG state; rank 0 also the small files), min-max over ranks;
  - save s / load s: the slowest rank's wall time (barrier before; save ends in a barrier);
    MB/s: checkpoint bytes / that time, and its % of the disk's single-stream write / read rate;
  - read MB/rank: what each rank read() during load (max over ranks, /proc/self/io rchar: read
    syscalls, cached or not);
  - extra peak MB: the most any rank's resident set rose above its resident set just before save
    (or load): the kernel's RSS high-water mark (VmHWM) is reset through /proc/self/clear_refs
    just before and read just after, so it catches every allocation (torch, Python, safetensors)
    however brief; page-cache pages of the written files are not RSS and do not count. Printed next
    to the rank's share of the checkpoint bytes (the most it could need to stage its share).

Then, in the same launch, the background save (trainer.async_save), for the claim that training
stalls no more than the host copy plus 10% and less than a synchronous save. Each rank times
Checkpointer._snapshot(copy=True) alone (the host copy; best of 2). Then cfg.trainer.async_save is
set and, --async-rounds times: --async-steps training steps with no write in flight (each followed
by poll(), as the trainer does), save() (from a barrier to its return: staging, the host copy,
starting the writer thread), then steps with poll() until poll() makes the checkpoint visible (at
most --max-async-steps; wait() then finishes any left), then as many
steps again with nothing in flight. Printed per DP (slowest rank; mean over the rounds):

  - host copy s; async save() returns s; steps slowed by s: the steps run while the writer was in
    flight minus as many steps at the median time of the steps before and after with none;
  - async stall total s = returns + slowed; sync save s (the synchronous save above); stall / host
    copy and stall / sync; steps overlapped, the baseline step time and what wait() still blocked.

On a CPU-only machine the writer thread competes with training for the same cores, so the slowed
steps are part of the cost here; on a GPU node they would be smaller. Every background save is
finished (wait()) before the launch ends.

Timings on a shared machine are noisy; nothing is asserted: it prints numbers.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 1 << 20
SPARE = "1*"  # the --spare-core run's label
BLOCK = 4 * MB


# -- the disk -------------------------------------------------------------------------------------

def drop_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (clean pages only: fsync first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_bytes(paths) -> int:
    """Bytes of these files in the page cache (util-linux fincore), or -1 when it cannot tell."""
    if not shutil.which("fincore"):
        return -1
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                             capture_output=True, text=True, check=True).stdout
        return sum(int(line) for line in out.split())
    except (subprocess.CalledProcessError, ValueError):
        return -1


def read_file(path: Path) -> int:
    buf, total = bytearray(BLOCK), 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return total
            total += n


def disk_rates(directory: Path, size_mb: int) -> dict:
    path = directory / "disk_probe.bin"
    block = os.urandom(BLOCK)  # incompressible
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(size_mb * MB // BLOCK):
            f.write(block)
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    drop_cache(path)
    left = cached_bytes([path])
    start = time.perf_counter()
    n = read_file(path)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    read_file(path)
    cached_s = time.perf_counter() - start
    path.unlink()
    return {"mb": n / MB, "write": n / MB / write_s, "read": n / MB / read_s,
            "cached_read": n / MB / cached_s, "cached_after_drop_mb": left / MB if left >= 0 else None}


# -- one rank of one DP size ----------------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(re.search(r"^rchar:\s+(\d+)", f.read(), re.M).group(1))


def measured(work) -> tuple:
    """(seconds, extra peak RSS MB above the RSS at the start, bytes read()) of work()."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base, rchar = _status_kb("VmRSS"), _rchar()
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    return seconds, (_status_kb("VmHWM") - base) / 1024, _rchar() - rchar


def bench_rank(rank: int, layout, overrides: list, run_dir: str, out: str, rounds: int,
               min_steps: int, max_steps: int, spare_core: bool = False) -> None:
    import torch
    import torch.distributed as dist

    if spare_core:  # training (and every thread it starts) on core 0, one torch thread
        os.sched_setaffinity(0, {0})
        torch.set_num_threads(1)

    from tests.train_steps import make_engine, train
    from training.checkpoint import files
    from training.checkpoint.checkpointer import Checkpointer
    from training.trainer import LoopState

    cfg, engine = make_engine(overrides + [f"trainer.run_dir={run_dir}"], layout)
    train(cfg, engine, layout, 0, 1)
    gbs = cfg.trainer.global_batch_size
    checkpointer = Checkpointer(cfg, layout, engine)
    rss_state = _status_kb("VmRSS") / 1024
    holder = {}

    dist.barrier()
    save_s, save_peak, _ = measured(lambda: holder.setdefault("dir", checkpointer.save(LoopState(1, gbs, gbs * 32))))
    directory = holder["dir"]
    manifest = files.read_manifest(directory)
    mine = [f"model/rank{rank:05d}.safetensors", f"optim/rank{rank:05d}.safetensors", f"rng/rank{rank:05d}.pt"]
    written = sum(manifest["files"][f]["bytes"] for f in mine if f in manifest["files"])
    if rank == 0:  # the small files and the manifest are rank 0's
        ranked = re.compile(r"^(model|optim|rng)/rank\d+\.")
        written += sum(e["bytes"] for f, e in manifest["files"].items() if not ranked.match(f))
        written += (Path(directory) / files.MANIFEST).stat().st_size
        paths = [p for p in Path(directory).rglob("*") if p.is_file()]
        for path in paths:
            drop_cache(path)
        left = cached_bytes(paths)
    dist.barrier()
    load_s, load_peak, read = measured(lambda: checkpointer.load(directory))
    dist.barrier()
    result = {"rank": rank, "save_s": save_s, "load_s": load_s, "save_peak_mb": save_peak,
              "load_peak_mb": load_peak, "written_mb": written / MB, "read_mb": read / MB,
              "rss_state_mb": rss_state}
    result.update(bench_async(cfg, engine, layout, checkpointer, rounds, min_steps, max_steps, spare_core))
    if rank == 0:
        result["total_mb"] = sum(e["bytes"] for e in manifest["files"].values()) / MB
        result["params"] = sum(p.numel() for p in engine.module.parameters())
        result["cached_after_drop_mb"] = left / MB if left >= 0 else None
    Path(f"{out}.rank{rank}").write_text(json.dumps(result))


def bench_async(cfg, engine, layout, checkpointer, rounds: int, min_steps: int, max_steps: int,
                spare_core: bool = False) -> dict:
    """This rank's host-copy times and, per round, the async save's return time, its steps (time
    of each, poll() included) and the residual wait(), and the baseline steps around them."""
    import statistics

    import torch.distributed as dist

    from tests.train_steps import train
    from training.trainer import LoopState

    gbs = cfg.trainer.global_batch_size
    step = 1  # one step was taken before the synchronous save

    def timed_step() -> tuple:
        nonlocal step
        start = time.perf_counter()
        train(cfg, engine, layout, step, 1)
        done = checkpointer.poll()  # as the trainer does at each step boundary
        step += 1
        return time.perf_counter() - start, done

    copies = []
    for _ in range(2):
        dist.barrier()
        start = time.perf_counter()
        snapshot = checkpointer._snapshot(LoopState(step, gbs * step, gbs * step * 32), copy=True)
        copies.append(time.perf_counter() - start)
        del snapshot

    cfg.trainer.async_save = True  # Checkpointer.save() reads it at each call
    out = {"copy_s": copies, "rounds": []}
    try:
        for _ in range(rounds):
            before = [timed_step()[0] for _ in range(min_steps)]
            dist.barrier()
            start = time.perf_counter()
            checkpointer.save(LoopState(step, gbs * step, gbs * step * 32))
            if spare_core:  # the writer thread on the core training leaves alone
                os.sched_setaffinity(checkpointer._pending.thread.native_id, {1})
            returned = time.perf_counter() - start
            during, done = [], None
            while done is None and len(during) < max_steps:
                seconds, done = timed_step()
                during.append(seconds)
            start = time.perf_counter()
            left = checkpointer.wait()  # None when poll() already finished it
            residual = time.perf_counter() - start
            after = [timed_step()[0] for _ in range(len(during))]
            baseline = statistics.median(before + after)
            out["rounds"].append({"return_s": returned, "during": during, "before": before, "after": after,
                                  "baseline_step_s": baseline,
                                  "extra_s": sum(during) - baseline * len(during),
                                  "finished_in_steps": done is not None, "wait_s": residual,
                                  "waited": left is not None})
    finally:
        checkpointer.wait()  # no background save outlives the launch
        cfg.trainer.async_save = False
    dist.barrier()
    return out


# -- the driver -----------------------------------------------------------------------------------

def run_dp(dp: int, overrides: list, work: Path, rounds: int, min_steps: int, max_steps: int,
           spare_core: bool = False) -> list:
    from parallelism.topology import Layout
    from tests.multiprocess import run_processes

    run_dir = work / f"dp{dp}{'-spare-core' if spare_core else ''}"
    out = str(run_dir) + ".json"
    run_processes(bench_rank, Layout(1, 1, dp), Layout(1, 1, dp), overrides, str(run_dir), out, rounds,
                  min_steps, max_steps, spare_core)
    results = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(dp)]
    shutil.rmtree(run_dir, ignore_errors=True)
    return results


def code_version() -> str:
    """The commit, and whether the checkpoint code differs from it (a shared tree may be mid-edit)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "training", "parallelism"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}" + (" with uncommitted changes under training/ or parallelism/" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--disk-mb", type=int, default=512, help="size of the disk probe file")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where checkpoints go (default: a temporary directory here)")
    parser.add_argument("--async-rounds", type=int, default=2, help="async saves per DP size")
    parser.add_argument("--async-steps", type=int, default=3,
                        help="baseline steps before each async save (and the fewest counted after it)")
    parser.add_argument("--spare-core", action="store_true",
                        help="also DP 1 with training on core 0 (one torch thread) and the writer on core 1, "
                             "as on a GPU node where training leaves host cores idle")
    parser.add_argument("--max-async-steps", type=int, default=20,
                        help="most steps run after an async save waiting for poll() to finish it")
    args = parser.parse_args()

    parent = args.dir or Path.cwd()
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=parent))
    overrides = [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
                 f"model.num_heads={args.heads}", "parallel.zero_stage=1", "trainer.precision=fp32"]
    try:
        probes = [disk_rates(work, args.disk_mb)]
        runs = {dp: run_dp(dp, overrides, work, args.async_rounds, args.async_steps, args.max_async_steps)
                for dp in args.dp}
        if args.spare_core and len(os.sched_getaffinity(0)) >= 2:
            runs[SPARE] = run_dp(1, overrides, work, args.async_rounds, args.async_steps, args.max_async_steps,
                                 spare_core=True)
        probes.append(disk_rates(work, args.disk_mb))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # A shared or virtual disk varies from one minute to the next: the ratios are given against
    # both probes (before and after the runs), as a range: low = against the faster probe.
    def pct(rate: float, key: str) -> str:
        low, high = (100 * rate / max(p[key] for p in probes), 100 * rate / min(p[key] for p in probes))
        return f"{low:.0f}-{high:.0f}%"

    print(f"directory: {work} (removed); product code: {code_version()}")
    for when, probe in zip(("before", "after"), probes):
        dropped = probe["cached_after_drop_mb"]
        print(f"disk {when} the runs, one stream, {probe['mb']:.0f} MB: write+fsync {probe['write']:.0f} MB/s, "
              f"read after FADV_DONTNEED {probe['read']:.0f} MB/s ("
              f"{'still cached after the drop: ' + format(dropped, '.0f') + ' MB' if dropped is not None else 'cache state unknown'}"
              f"), read from page cache {probe['cached_read']:.0f} MB/s")
    first = runs[args.dp[0]][0]
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, {first['params'] / 1e6:.1f} M "
          f"parameters; ZeRO-1, fp32, after 1 step; {args.dp} processes on {os.cpu_count()} cores")
    header = ("DP", "total MB", "per-rank MB", "save s", "save MB/s", "% disk wr", "load s", "load MB/s",
              "% disk rd", "read MB/rank", "state MB/rank", "save +peak MB", "share MB", "load +peak MB")
    rows = []
    for dp, results in runs.items():
        zero = results[0]
        total = zero["total_mb"]
        written = [r["written_mb"] for r in results]
        save_s = max(r["save_s"] for r in results)
        load_s = max(r["load_s"] for r in results)
        peak = max(results, key=lambda r: r["save_peak_mb"])
        rows.append((dp, f"{total:.0f}", f"{min(written):.0f}-{max(written):.0f}", f"{save_s:.2f}",
                     f"{total / save_s:.0f}", pct(total / save_s, "write"), f"{load_s:.2f}",
                     f"{total / load_s:.0f}", pct(total / load_s, "read"),
                     f"{max(r['read_mb'] for r in results):.0f}",
                     f"{max(r['rss_state_mb'] for r in results):.0f}",
                     f"{peak['save_peak_mb']:.0f}", f"{peak['written_mb']:.0f}",
                     f"{max(r['load_peak_mb'] for r in results):.0f}"))
        if (zero.get("cached_after_drop_mb") or 0) >= 1:
            print(f"DP {dp}: {zero['cached_after_drop_mb']:.0f} MB of the checkpoint still cached when load began")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    print("save/load MB/s: checkpoint bytes / slowest rank's time; % of the one-stream disk rates above (against the faster-slower probe). "
          "+peak: most any rank's RSS high-water mark rose above its RSS just before save/load; share MB: "
          "that rank's bytes written; state MB/rank: RSS after the step (training state + libraries).")
    print_async(runs, args)


def print_async(runs: dict, args) -> None:
    print()
    print(f"async save (trainer.async_save=True): training time lost per save, mean of {args.async_rounds} "
          f"saves per DP; all values the slowest rank's")
    header = ("DP", "host copy s", "async save() returns s", "steps slowed by s", "async stall total s",
              "sync save s", "stall / host copy", "stall / sync", "steps overlapped", "base step s",
              "wait() after s")
    rows, notes = [], []
    for dp, results in runs.items():
        n = len(results[0]["rounds"])
        copy = max(min(r["copy_s"]) for r in results)
        returns = [max(r["rounds"][i]["return_s"] for r in results) for i in range(n)]
        extras = [max(r["rounds"][i]["extra_s"] for r in results) for i in range(n)]
        stalls = [max(r["rounds"][i]["return_s"] + r["rounds"][i]["extra_s"] for r in results) for i in range(n)]
        waits = [max(r["rounds"][i]["wait_s"] for r in results) for i in range(n)]
        steps = [len(results[0]["rounds"][i]["during"]) for i in range(n)]
        base = [max(r["rounds"][i]["baseline_step_s"] for r in results) for i in range(n)]
        finished = all(r["rounds"][i]["finished_in_steps"] for r in results for i in range(n))
        stall = sum(stalls) / n
        sync = max(r["save_s"] for r in results)
        rows.append((dp, f"{copy:.2f}", f"{sum(returns) / n:.2f}", f"{sum(extras) / n:.2f}", f"{stall:.2f}",
                     f"{sync:.2f}", f"{stall / copy:.2f}", f"{stall / sync:.2f}",
                     "/".join(map(str, steps)), "/".join(f"{b:.2f}" for b in base),
                     "/".join(f"{w:.2f}" for w in waits)))
        notes.append(f"DP {dp}: per save: stall " + ", ".join(f"{x:.2f}" for x in stalls)
                     + " s; save() returned in " + ", ".join(f"{x:.2f}" for x in returns)
                     + " s; steps slowed by " + ", ".join(f"{x:.2f}" for x in extras) + " s; host copies "
                     + ", ".join(f"{max(r['copy_s'][i] for r in results):.2f}" for i in range(2)) + " s"
                     + ("" if finished else f"; the writer outlived {args.max_async_steps} steps (wait() above blocked)"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    for note in notes:
        print(note)
    if SPARE in runs:
        print(f"DP {SPARE}: DP 1 with training pinned to core 0 (one torch thread) and the writer thread to core 1 "
              "(--spare-core): the host cores a GPU node's training leaves idle.")
    print("host copy: Checkpointer._snapshot(copy=True) alone, best of 2 per rank, slowest rank. async save() returns: "
          "from the call (after a barrier) to its return (barrier, staging dir, the host copy, writer thread start). "
          "steps slowed by: the steps run after it, each with poll() as the trainer does, until poll() made the "
          "checkpoint visible (steps overlapped), minus as many baseline steps (median of the "
          f"{args.async_steps} steps before and as many after with no write in flight: base step s). "
          "stall = returns + slowed, per rank, slowest rank; sync save s: the synchronous save() above (one run). "
          "wait() after: what wait() still blocked once the steps were done (0 when poll() had finished it).")
    print(f"On these {os.cpu_count()} CPU cores the writer thread (chunk digests, the O_DIRECT write, fsync) competes with "
          "training for the same cores, so the slowed-steps part is real here; on a GPU node, where steps run on "
          "the GPU and the writer on otherwise idle host cores, it would be smaller.")


if __name__ == "__main__":
    main()
