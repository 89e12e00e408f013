"""bloom-plot: PNG figures of one or more runs, overlaid (training/plots.py says which).

    bloom-plot RUN_DIR [RUN_DIR ...] --out DIR

Reads each RUN_DIR/metrics.jsonl; writes DIR/loss.png, valid_loss.png, lr_batch.png,
grad_norm.png and throughput.png, and prints their paths.
"""
import argparse
import sys
from pathlib import Path

from launch.heap import freeze_heap_at_exit

PROG = "bloom-plot"
EXAMPLES = """Examples:
  bloom-plot runs/bloom-tiny --out plots/bloom-tiny
  bloom-plot runs/bloom-tiny runs/bloom-tiny-bf16 --out plots/compare
"""


def main(argv=None) -> int:
    freeze_heap_at_exit()  # launch/heap.py: no heap walk at exit
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="a bloom-train run directory")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the PNGs go")
    args = parser.parse_args(argv)
    from training.plots import PlotError, plot_runs

    try:
        written = plot_runs(args.runs, args.out)
    except PlotError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    for path in written.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
