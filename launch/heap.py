"""The cyclic garbage collector around a rank's start-up and exit.

A process that imports torch, megatron-core, DeepSpeed and transformers and builds a model and its
engine holds millions of long-lived objects the collector tracks, and every full collection walks
all of them, to find almost nothing. Measured on these 2-core machines, per rank of a 4-rank
bloom-train launch of the tiny model (py-spy, gc.callbacks; docs/measurements.md):
- start-up: 7-13 full collections, 1.5-2.9 s, triggered by the import and build of those objects;
- exit: CPython clears every module and runs full collections again, 1.5-2 s of CPU per rank,
  after the run has ended and before torchrun or srun sees it end.
Megatron-LM answers the same cost in the loop with --manual-gc. Here the imports run without
collections, and the heap they made is then frozen (gc.freeze: moved out of the collector's reach;
modules and their functions live until exit anyway), so that the collections of the build and
the loop walk only what those made. At exit the heap is frozen again, as the last atexit handler:
the other atexit handlers, the joins of non-daemon threads (which come before atexit) and the
closing of files as modules are cleared (reference counting, not the collector) all still happen;
only the final walk is skipped, over memory the operating system takes back anyway.
"""
import atexit
import functools
import gc


def freeze_heap_at_exit() -> None:
    """Register gc.freeze to run at exit after the atexit handlers registered later (LIFO); once."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


def quiet_startup(main):
    """Decorate a console script's main: no automatic collections until it calls start_collecting()
    (a start-up that fails exits soon anyway), the heap frozen at exit. Called in-process (tests),
    main leaves the collector as it found it."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        freeze_heap_at_exit()
        enabled = gc.isenabled()
        gc.disable()
        try:
            return main(*args, **kwargs)
        finally:
            gc.unfreeze()
            if enabled:
                gc.enable()
    return wrapper


def start_collecting() -> None:
    """The frameworks are imported: freeze what they made, and collect again."""
    gc.freeze()
    gc.enable()
