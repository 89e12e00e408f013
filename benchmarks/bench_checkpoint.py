"""Checkpoint save and load throughput against this disk's own sequential rates, and the save's
extra peak memory per rank, at DP 1, 2 and 4 (CPU, gloo), side by side in one run.

    python benchmarks/bench_checkpoint.py [--hidden 768] [--layers 4] [--heads 12]
                                          [--dp 1 2 4] [--disk-mb 512] [--dir PATH]

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
    syscalls, cached or not; pages safetensors maps are not counted);
  - extra peak MB: the most any rank's resident set rose above its resident set just before save
    (or load): the kernel's RSS high-water mark (VmHWM) is reset through /proc/self/clear_refs
    just before and read just after, so it catches every allocation (torch, Python, safetensors)
    however brief; page-cache pages of the written files are not RSS and do not count. Printed next
    to the rank's share of the checkpoint bytes (the most it could need to stage its share).

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


def bench_rank(rank: int, layout, overrides: list, run_dir: str, out: str) -> None:
    import torch.distributed as dist

    from tests.train_steps import make_engine, train
    from training.checkpoint import files
    from training.checkpoint.checkpointer import Checkpointer
    from training.train import LoopState

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
    if rank == 0:
        result["total_mb"] = sum(e["bytes"] for e in manifest["files"].values()) / MB
        result["params"] = sum(p.numel() for p in engine.module.parameters())
        result["cached_after_drop_mb"] = left / MB if left >= 0 else None
    Path(f"{out}.rank{rank}").write_text(json.dumps(result))


# -- the driver -----------------------------------------------------------------------------------

def run_dp(dp: int, overrides: list, work: Path) -> list:
    from parallelism.topology import Layout
    from tests.multiprocess import run_processes

    run_dir = work / f"dp{dp}"
    out = str(work / f"dp{dp}.json")
    run_processes(bench_rank, Layout(1, 1, dp), Layout(1, 1, dp), overrides, str(run_dir), out)
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
    args = parser.parse_args()

    parent = args.dir or Path.cwd()
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=parent))
    overrides = [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
                 f"model.num_heads={args.heads}", "parallel.zero_stage=1", "trainer.precision=fp32"]
    try:
        probes = [disk_rates(work, args.disk_mb)]
        runs = {dp: run_dp(dp, overrides, work) for dp in args.dp}
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


if __name__ == "__main__":
    main()
