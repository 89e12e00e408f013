"""Saving and loading a running DeepSpeed engine in the layout-independent formats of
training/checkpoint/files.py, so a checkpoint saved at one TP x PP x DP (and ZeRO stage) loads at
any other.

Saving (format 2, training/checkpoint/fragments.py): each rank writes the fragments of the fp32
masters and Adam moments its optimizer holds (its ZeRO partition of its TP shard; the whole shard
on DP rank 0 without ZeRO), and its RNG states, hashes and fsyncs them; no tensor is gathered.
Rank 0 adds Adam's step count and the loss-scaler state, the loop state (iteration, consumed
samples and tokens: the LR schedule and the batch rampup are functions of consumed samples), the
resolved config and the tokenizer, and the manifest with every rank's hashes.

Loading: each rank checks the checksums of the files it will read, all ranks agree, then each
reads the TP shard of one parameter at a time and hands it to DeepSpeed, which keeps its own
partition. Format 1 checkpoints (whole TP shards; bloom-import writes them) load the same way.
"""
import functools
import json
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from training.checkpoint import files
from training.checkpoint.file_image import FileImage
from training.checkpoint.fragments import (MASTER, Fragment, FragmentReader, fragment_file, prepare_fragments,
                                          write_fragments)
from training.checkpoint.model_shape import check_same_model, model_shape
from training.checkpoint.rng_state import rng_state, set_rng_state
from training.config.schema import ConfigError
from training.engine.optimizer_state import ADAM_STATES, OptimizerState
# Fault injection for the tests: SIGKILL this process in the middle of saving this iteration.
KILL_DURING_SAVE_ENV = "BLOOM_TEST_KILL_DURING_SAVE"


@dataclass(frozen=True)
class LoopPosition:
    iteration: int
    consumed_samples: int
    consumed_tokens: int
    # The loop's small run state as JSON (training/spikes.py: skip ranges, spike detector window);
    # trainer_state.json keeps it under "spikes". Older checkpoints lack it: no ranges.
    spikes: str = "{}"


@dataclass
class Snapshot:
    """What one rank saves, taken at a step boundary: its fragments as [(Fragment, tensor)] views
    of the optimizer's state, or (for a background write) already copied into file images."""
    model: Union[list, FileImage, None]
    optim: Union[list, FileImage, None]
    rng: dict
    loop: LoopPosition
    optim_meta: dict  # Adam's step count and the loss-scaler state (rank 0 writes them)


@dataclass
class PendingSave:
    final: Path
    staging: Path
    snapshot: Snapshot
    thread: Optional[threading.Thread] = None
    hashed: Optional[dict] = None
    error: Optional[str] = None

    def run(self, write) -> None:
        try:
            self.hashed = write(self.staging, self.snapshot)
        except Exception as failure:  # reported to every rank by Checkpointer.wait
            self.error = f"{type(failure).__name__}: {failure}"

    def run_in_background(self, write) -> None:
        """run(), at the lowest CPU priority: the writer should take the cycles training leaves
        (on Linux a thread has its own nice value)."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        self.run(write)


class Checkpointer:
    def __init__(self, cfg, layout, engine, tokenizer_dir: Optional[Path] = None):
        self.cfg, self.layout, self.engine = cfg, layout, engine
        self.root = Path(cfg.trainer.run_dir) / "checkpoints"
        self.tokenizer_dir = tokenizer_dir
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.state = OptimizerState(engine, cfg.model.num_layers)
        self.params = self.state.params  # [(canonical name, parameter)] this rank holds
        self._pending: Optional[PendingSave] = None
        self._images: dict = {}  # kind -> the FileImage of the last background save (reused)
        self._pruner: Optional[threading.Thread] = None  # deleting old checkpoints (see _prune)
        self._ranges: dict = {}  # per load, at ZeRO: name -> this rank's partition (see _needed)

    # -- saving ------------------------------------------------------------------------------

    def save(self, loop_state) -> Path:
        """Every rank writes, hashes and fsyncs its own fragments and RNG state; rank 0 adds the
        small files and the manifest (with every rank's hashes) and makes the checkpoint visible.

        With trainer.async_save the state is first copied to host memory (at the step boundary,
        so it is the state of this iteration) and written by a thread while training goes on;
        the checkpoint becomes visible in poll() or wait() once every rank's part is durable.
        A save started while another is in flight waits for it first."""
        self.wait()
        final = files.iteration_dir(self.root, loop_state.iteration)
        staging = files.staging_dir(final)
        if dist.get_rank() == 0:
            for stale in [*self.root.glob(".iter_*.partial"), *self.root.glob(".iter_*.deleting")]:
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        # A background write needs its own host copy (training goes on changing the state); a
        # synchronous one writes from the optimizer's tensors directly, adding no copy on CPU.
        snapshot = self._snapshot(loop_state, copy=self.cfg.trainer.async_save)
        self._pending = PendingSave(final, staging, snapshot)
        if self.cfg.trainer.async_save:
            self._pending.thread = threading.Thread(target=self._pending.run_in_background, args=(self._write,),
                                                    name="checkpoint-writer", daemon=True)
            self._pending.thread.start()
            return final
        self._pending.run(self._write)
        return self.wait()

    def poll(self) -> Optional[Path]:
        """At a step boundary: finish a background save if every rank's writer is done (one
        scalar all-reduce while a save is in flight); returns the checkpoint it made visible."""
        if self._pending is None:
            return None
        done = torch.tensor([float(not self._pending.thread.is_alive())])
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return self.wait(prune_in_background=True) if done.item() == 1.0 else None

    def wait(self, prune_in_background: bool = False) -> Optional[Path]:
        """Finish the save in flight, if any (every rank together); returns its directory. From
        poll() (training goes on) the old checkpoints are deleted by a thread."""
        self._join_pruner()
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.thread is not None:
            pending.thread.join()
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, pending.hashed if pending.error is None else pending.error)
        failed = [part for part in everyone if isinstance(part, str)]
        if failed:
            raise files.CheckpointError(f"saving {pending.final} failed: {failed[0]}")
        if dist.get_rank() == 0:
            files.finalize(pending.staging, pending.final, self._manifest(pending.snapshot.loop),
                           hashed={k: v for part in everyone for k, v in part.items()})
            self._prune(prune_in_background)
        dist.barrier()
        return pending.final

    def _join_pruner(self) -> None:
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    def _snapshot(self, loop_state, copy: bool) -> "Snapshot":
        """Everything this rank saves, taken at the step boundary: copied into the images of its
        files (copy=True, for a background write: the host copy), or flat views of the tensors
        (for a write that finishes before training goes on; it copies into the image itself)."""
        moments = self.state.has_moments()
        if moments:
            self.state.ensure_adam_state()
        model, optim = [], []
        for name, param in self.params:
            if not self._owns(name):
                continue
            piece = self.state.local_piece(param, moments)
            if piece is None:
                continue
            offset, numel, master, states = piece
            fragment = functools.partial(self._fragment, name, param, offset, numel)
            model.append((fragment(MASTER), master.detach().reshape(-1)))
            optim += [(fragment(key), value.detach().reshape(-1)) for key, value in states.items()]
        loop = LoopPosition(loop_state.iteration, loop_state.consumed_samples, loop_state.consumed_tokens,
                            json.dumps(getattr(loop_state, "spikes", {})))  # a copy, as of this step
        if copy:
            # Background saves keep their images from one save to the next: the memory is paged
            # in once, not at every step boundary that saves (each save waits for the previous).
            model, optim = (prepare_fragments(pieces, self._images.get(kind)) if pieces else None
                            for kind, pieces in (("model", model), ("optim", optim)))
            self._images = {"model": model, "optim": optim}
        return Snapshot(model, optim, rng_state(self.engine), loop,
                        {"adam_step": self.state.adam_step(), "loss_scaler": self.state.loss_scaler_state()})

    def _write(self, staging: Path, snapshot: "Snapshot") -> dict:
        """Write this rank's files of a snapshot; returns their manifest entries."""
        rank, hashed = dist.get_rank(), {}
        for kind, pieces in (("model", snapshot.model), ("optim", snapshot.optim)):
            if isinstance(pieces, FileImage):
                hashed[fragment_file(kind, rank)] = pieces.write(staging / fragment_file(kind, rank))
            elif pieces:
                hashed[fragment_file(kind, rank)] = write_fragments(staging / fragment_file(kind, rank), pieces)
        rel = f"rng/rank{rank:05d}.pt"
        (staging / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(snapshot.rng, staging / rel)
        with open(staging / rel, "rb") as f:
            os.fsync(f.fileno())
        hashed[rel] = files.digest_file(staging / rel)
        if rank == 0:  # the small files depend on no other rank: written here, off the training thread
            hashed.update(self._write_rank0_files(staging, snapshot))
        self._maybe_die_for_test(snapshot.loop.iteration)
        return hashed

    def _owns(self, name: str) -> bool:
        """Whether this rank saves its copy of `name`: one copy of each element is saved. Not the
        tied embedding's second copy on the last stage, nor a TP-replicated parameter on TP ranks
        past 0, nor, without ZeRO, anything on DP ranks past 0 (ZeRO's DP ranks hold disjoint
        partitions: each saves its own)."""
        if name == "word_embeddings.weight" and self.layout.pp > 1 and self.pp_rank != 0:
            return False
        if files.split_of(name).dim is None and self.tp_rank != 0:
            return False
        return self.state.zero() or self.dp_rank == 0

    def _fragment(self, name: str, param, offset: int, numel: int, state: str) -> Fragment:
        dim = files.split_of(name).dim
        shape = self.state.shape(param)
        tp_rank, tp_size = (0, 1) if dim is None else (self.tp_rank, self.layout.tp)
        if dim is not None:
            shape[dim] *= tp_size
        return Fragment(name, state, tuple(shape), dim, tp_rank, tp_size, offset, numel)

    def _write_rank0_files(self, staging: Path, snapshot: "Snapshot") -> dict:
        """The small files (Adam's step and loss scale, the loop position, the config, the
        tokenizer), durable; returns their manifest entries."""
        files.write_json(staging / "optim" / "meta.json", snapshot.optim_meta)
        loop = snapshot.loop
        files.write_json(staging / "trainer_state.json", {
            "iteration": loop.iteration, "consumed_samples": loop.consumed_samples,
            "consumed_tokens": loop.consumed_tokens, "spikes": json.loads(loop.spikes)})
        from training.config.loader import to_yaml

        (staging / "config.yaml").write_text(to_yaml(self.cfg))
        if self.tokenizer_dir and Path(self.tokenizer_dir).is_dir():
            shutil.copytree(self.tokenizer_dir, staging / "tokenizer")
        small = [staging / "optim" / "meta.json", staging / "trainer_state.json", staging / "config.yaml",
                 *sorted(p for p in (staging / "tokenizer").rglob("*") if p.is_file())]
        for path in small:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        return {str(p.relative_to(staging)): files.digest_file(p) for p in small}

    def _manifest(self, loop_state) -> dict:
        layout = self.layout
        return {"iteration": loop_state.iteration, "model": model_shape(self.cfg, layout.tp),
                "saved_layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
                "precision": self.cfg.trainer.precision}

    def _prune(self, in_background: bool) -> None:
        """Drop the checkpoints beyond the newest keep_checkpoints: each is first renamed to a
        hidden name (one atomic step: it is no longer a checkpoint), then deleted, by a thread
        when `in_background` (joined by the next wait(), save() or restore()), so the training
        thread does not wait for the unlinking."""
        keep = self.cfg.trainer.keep_checkpoints
        doomed = []
        for old in files.complete_checkpoints(self.root)[:-keep] if keep > 0 else []:
            hidden = old.parent / f".{old.name}.deleting"
            os.replace(old, hidden)
            doomed.append(hidden)
        delete = lambda: [shutil.rmtree(d, ignore_errors=True) for d in doomed]  # noqa: E731
        if doomed and in_background:
            self._pruner = threading.Thread(target=delete, name="checkpoint-pruner", daemon=True)
            self._pruner.start()
        elif doomed:
            delete()

    def _maybe_die_for_test(self, iteration: int) -> None:
        if os.environ.get(KILL_DURING_SAVE_ENV) == str(iteration) and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def roll_back_before(self, iteration: int) -> Optional[Path]:
        """For a loss-spike rollback: the newest complete checkpoint saved before `iteration`
        (rank 0's choice, on every rank), made `latest`; the newer ones, saved in the stretch being
        rolled back, are retired (renamed to hidden names, deleted at the next save), so no later
        resume or pruning picks one of them. None when there is no such checkpoint."""
        self.wait()
        chosen = [None]
        if dist.get_rank() == 0:
            complete = files.complete_checkpoints(self.root)
            before = [d for d in complete if int(d.name.split("_")[-1]) < iteration]
            if before:
                chosen = [str(before[-1])]
                pointer = self.root / f".{files.LATEST}.tmp"  # latest first: a crash after it is safe
                pointer.write_text(before[-1].name + "\n")
                os.replace(pointer, self.root / files.LATEST)
                for newer in complete[len(before):]:
                    os.replace(newer, newer.parent / f".{newer.name}.deleting")
        dist.broadcast_object_list(chosen, src=0)
        return Path(chosen[0]) if chosen[0] else None

    # -- loading -----------------------------------------------------------------------------

    def candidates(self, resume: str) -> list:
        """Checkpoints to try, best first: `latest` then older ones (auto), or the one given."""
        if resume == "none":
            return []
        if resume != "auto":
            path = Path(resume)
            latest = files.resolve_latest(path)
            return [latest] if latest else [path]
        complete = list(reversed(files.complete_checkpoints(self.root)))
        latest = files.resolve_latest(self.root)
        if latest in complete:
            complete.remove(latest)
            complete.insert(0, latest)
        return complete

    def restore(self, resume: str, say) -> Optional[tuple]:
        """(directory, trainer state) of the newest usable checkpoint, loaded; None for a fresh run.
        A checkpoint whose files fail their checksums on any rank is reported and the next older
        one tried, every rank together."""
        self.wait()  # a rollback waits for a save in flight
        for directory in self._agreed_candidates(resume):
            try:
                return directory, self.load(directory)
            except files.CheckpointError as error:
                say(f"checkpoint unusable: {error}; trying an older one")
        if resume not in ("auto", "none"):
            raise ConfigError(f"trainer.resume={resume}: no usable checkpoint there")
        return None

    def _agreed_candidates(self, resume: str) -> list:
        """Rank 0's list of checkpoints to try (filesystems may list late on other nodes)."""
        found = [[str(d) for d in self.candidates(resume)] if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(found, src=0)
        return [Path(d) for d in found[0]]

    def load(self, directory: Path) -> dict:
        """Restore weights, optimizer state and RNG from `directory`; returns its trainer state.
        Every rank first checks the checksums of the files it will read, and all agree, so a
        corrupt file stops the load before any state changes (CheckpointError on every rank)."""
        manifest = _agreed(lambda: files.read_manifest(directory))
        check_same_model(manifest["model"], model_shape(self.cfg, self.layout.tp), directory)
        same_layout = manifest["saved_layout"] == {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp}
        rng_file = f"rng/rank{dist.get_rank():05d}.pt"
        read_rng = same_layout and rng_file in manifest["files"]
        has_optim = any(f.startswith("optim/") and f.endswith(".safetensors") for f in manifest["files"])
        self._ranges, self._readers = {}, {}
        read = _agreed(lambda: self._verified_reader(directory, manifest, has_optim, read_rng and rng_file))
        meta = json.loads((Path(directory) / "optim" / "meta.json").read_text()) if has_optim else {}
        self.state.ensure_adam_state()
        for name, param in self.params:
            self.state.put(param, None, read("model", name, MASTER))
        self.state.refresh_weights()
        if has_optim:
            for key in ADAM_STATES:
                for name, param in self.params:
                    self.state.put(param, key, read("optim", name, key))
            self.state.set_adam_step(meta.get("adam_step", 0.0))
            self.state.restore_loss_scaler(meta.get("loss_scaler", {}))
        if read_rng:
            set_rng_state(self.engine, torch.load(Path(directory) / rng_file, weights_only=True))
        state = json.loads((Path(directory) / "trainer_state.json").read_text())
        state["same_layout"] = same_layout
        for reader in self._readers.values():
            reader.close()
        state["bytes_read"] = {purpose: sum(r.bytes_read[purpose] for r in self._readers.values())
                               for purpose in ("verify", "load")}
        state["tensor_bytes"] = sum(entry["bytes"] for rel, entry in manifest["files"].items()
                                    if rel.endswith(".safetensors"))
        return state

    def _verified_reader(self, directory: Path, manifest: dict, has_optim: bool, rng_file):
        """read(kind, name, state) -> what this rank loads of one tensor (its ZeRO partition, or
        without ZeRO its TP shard), after verifying everything it will read: the small files, the
        headers of the tensor files, and the chunks of the fragments it reads (format 1, whole
        shards written by earlier versions: the files it reads, whole)."""
        small = [f for f in ("optim/meta.json", "trainer_state.json", rng_file) if f and f in manifest["files"]]
        files.verify(directory, small)
        readers = self._readers = {kind: FragmentReader(directory, manifest, kind)
                                   for kind in ("model", "optim") if kind == "model" or has_optim}
        states = {"model": [MASTER], "optim": list(ADAM_STATES)}
        self._ranges = {name: self.state.partition(param) for name, param in self.params} if self.state.zero() else {}
        for kind, reader in readers.items():
            for name, param in self.params:
                needed = self._needed(name, param)
                for state in states[kind]:
                    if needed is not None:
                        reader.verify_range(name, state, *self._tp_coordinates(name), *needed)

        by_name = dict(self.params)

        def read(kind, name, state):
            param = by_name[name]
            needed = self._needed(name, param)
            if needed is None:
                return None
            value = readers[kind].read_range(name, state, *self._tp_coordinates(name), *needed)
            return value if self.state.zero() else value.view(param.shape)
        return read

    def _needed(self, name: str, param) -> Optional[tuple]:
        """(start, numel) of the flattened TP shard of `name` this rank loads: its ZeRO partition
        (None: it holds none), or the whole shard without ZeRO."""
        if self.state.zero():
            return self._ranges[name]
        return 0, param.numel()

    def _tp_coordinates(self, name: str) -> tuple:
        return (0, 1) if files.split_of(name).dim is None else (self.tp_rank, self.layout.tp)


def _agreed(work):
    """work()'s result on every rank, or the same CheckpointError on every rank when it failed on
    any (a rank must not go on into collectives the others have left)."""
    result, error = None, None
    try:
        result = work()
    except files.CheckpointError as failure:
        error = str(failure)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e is not None]
    if failed:
        raise files.CheckpointError(failed[0])
    return result
