"""One rank of a training job: process groups, the layout, the heartbeat, the Trainer, the exit
record. bloom-train calls run() in every rank's process."""
import sys
from pathlib import Path

import torch.distributed as dist

from parallelism.topology import (init_model_parallel, init_process_group, placement_lines, rank_hosts,
                                  shutdown)
from parallelism.watchdog import Heartbeat
from training import exit_record
from training.config.checks import validate
from training.config.loader import to_yaml
from training.guards import TrainingStopped
from training.trainer import Trainer


def write_resolved_config(cfg) -> None:
    path = Path(cfg.trainer.run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


def run(cfg) -> int:
    """Train in this process (one rank of the job); returns the exit status."""
    timeout_s = cfg.parallel.collective_timeout_s
    init_process_group(timeout_s=timeout_s)
    try:
        layout = validate(cfg, dist.get_world_size(), trains_here=True)
        init_model_parallel(layout, timeout_s)
        hosts = rank_hosts()
        if dist.get_rank() == 0:
            write_resolved_config(cfg)
            # Which host each rank is on: on many nodes, the first thing to read when one fails.
            print(f"placement: {len(hosts)} rank(s) on {len(set(hosts))} host(s), collective "
                  f"timeout {timeout_s:g} s", flush=True)
            print("\n".join(placement_lines(hosts, layout)), flush=True)
        heartbeat = Heartbeat.start(hosts, timeout_s)  # names the rank or node that goes silent
        trainer = Trainer(cfg, layout)
        silence = None
        if heartbeat:
            heartbeat.follow(lambda: trainer.state.iteration)
        try:
            state = trainer.train()
        except TrainingStopped as error:
            if dist.get_rank() == 0:
                print(f"bloom-train: error: {error}", file=sys.stderr, flush=True)
            return 3
        except RuntimeError as error:  # gloo/NCCL: a peer died or stopped answering?
            silence = heartbeat.diagnose() if heartbeat else None
            if silence is None:
                raise
            trainer.exit_reason = silence.reason
            if silence.reporter:  # one line for the job, not one stack per rank
                print(f"bloom-train: error: {silence.message(error, timeout_s)}", file=sys.stderr, flush=True)
            return 4
        finally:
            trainer.close()
            if heartbeat:
                heartbeat.stop()
            if (silence.reporter if silence else dist.get_rank() == 0):
                exit_record.write(cfg.trainer.run_dir, trainer.exit_reason or "error",
                                  trainer.start_iteration, trainer.state.iteration,
                                  **(silence.record() if silence else {}))
        if dist.get_rank() == 0 and state.history:
            first, last = state.history[0][1], state.history[-1][1]
            ended = "done" if trainer.exit_reason == "finished" else f"stopped ({trainer.exit_reason})"
            print(f"{ended}: {state.iteration} iterations, {state.consumed_samples} samples, "
                  f"lm_loss {first:.4f} -> {last:.4f}", flush=True)
        return 0
    finally:
        shutdown()
