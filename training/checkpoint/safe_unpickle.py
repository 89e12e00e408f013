"""Reading the pickles Megatron-DeepSpeed and DeepSpeed write (*.pt) without running anything.

A pickle names Python callables ("globals") that plain unpickling imports and calls: a .pt file
from elsewhere can run any code. torch's weights_only unpickler admits tensors, storages and
plain containers only; the few other types these checkpoints hold are admitted here by name and
rebuilt as harmless stand-ins defined in this file, so no Megatron or DeepSpeed code is imported
or run to read them:

    argparse.Namespace                                Megatron's args (the real class: it only
                                                      holds attributes)
    deepspeed.utils.tensor_fragment.fragment_address  where a parameter sits in a ZeRO flat group
    deepspeed's loss scalers, megatron's enums,       held as opaque attribute bags: read, never used
    numpy's RNG state arrays, pathlib paths

Anything else is refused in one line naming the file and the global, before it is called, even
what other libraries admitted process-wide (megatron-core admits numpy's real constructors and its
own classes when imported): a read here admits this list alone.
"""
import argparse
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from training.checkpoint.files import CheckpointError


class UnsafePickle(CheckpointError):
    """A .pt file whose pickle names a global this reader does not admit."""


class FragmentAddress:
    """Stand-in for deepspeed.utils.tensor_fragment.fragment_address (a dataclass of two ints)."""

    numel: int
    start: int

    def __init__(self, numel: int = 0, start: int = 0):
        self.numel, self.start = numel, start

    def __repr__(self) -> str:
        return f"FragmentAddress(numel={self.numel}, start={self.start})"


class Opaque:
    """Stand-in for state this importer never uses (an enum value, a loss scaler, a numpy array
    of an RNG state): it takes whatever the pickle hands it and keeps it, calling nothing."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _opaque_function(*args, **kwargs):
    return Opaque(*args)


OPAQUE_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "megatron.enums.PositionEmbeddingType",
    "megatron.enums.AttnMaskType",
    "megatron.enums.AttnType",
    "megatron.enums.LayerType",
    "megatron.model.enums.PositionEmbeddingType",
    "megatron.model.enums.AttnMaskType",
    "megatron.model.enums.AttnType",
    "megatron.model.enums.LayerType",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    "pathlib.PosixPath",
    "pathlib.Path",
)
OPAQUE_FUNCTIONS = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
ADMITTED = ([(argparse.Namespace, "argparse.Namespace"),
             (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address")]
            + [(Opaque, name) for name in OPAQUE_CLASSES]
            + [(_opaque_function, name) for name in OPAQUE_FUNCTIONS])


@contextmanager
def _admitting_only(admitted: list):
    """torch's allowlist, for the duration of one read, set to `admitted` and nothing else."""
    before = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(admitted)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def load(path, mmap: bool = False) -> object:
    """The object pickled in `path` (tensors on CPU), or UnsafePickle / CheckpointError in one line.
    mmap: tensors stay in the file until used (zip-format files, what torch.save writes since 1.6),
    so a reader that slices a few parameters out of a large file does not hold all of it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with _admitting_only(ADMITTED):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or ValueError here
        message = str(error)
        refused = re.search(r"GLOBAL (\S+)", message) or re.search(r"unrecognized function (\S+)", message)
        if refused is not None or "UnpicklingError" in type(error).__name__:
            what = refused.group(1) if refused else message.splitlines()[0]
            raise UnsafePickle(f"{path}: refused to unpickle {what}: only tensors, argparse.Namespace and "
                               "DeepSpeed's checkpoint state are read from .pt files (nothing was run)") from None
        raise CheckpointError(f"{path}: unreadable .pt file ({message.splitlines()[0] if message else type(error).__name__})") from None
