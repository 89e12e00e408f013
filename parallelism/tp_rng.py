"""Random streams for dropout under tensor parallelism, on CPU and CUDA alike.

Dropout on activations every TP rank holds whole (hidden dropout) must draw the same mask on all
TP ranks, or the replicas diverge: it uses the default generator, seeded identically across TP.
Dropout inside a TP region (attention probabilities of this rank's heads) must draw a different,
reproducible mask per rank: it runs inside `fork()`, which swaps in a stream seeded per TP rank.
This is the contract of megatron-core's CudaRNGStatesTracker, which only works on CUDA; the
offset 2718 is Megatron's, so seeds line up with Megatron-trained runs.
"""
import contextlib

import torch

TP_SEED_OFFSET = 2718


class TensorParallelRNG:
    def __init__(self, seed: int, tp_rank: int, device: torch.device):
        self.device = torch.device(device)
        self._state = self._fresh_state(seed + TP_SEED_OFFSET + tp_rank)

    def _get_default(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set_default(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def _fresh_state(self, seed: int) -> torch.Tensor:
        saved = self._get_default()
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        fresh = self._get_default()
        self._set_default(saved)
        return fresh

    @contextlib.contextmanager
    def fork(self):
        """Run the body on this rank's own stream, then return to the shared one."""
        shared = self._get_default()
        self._set_default(self._state)
        try:
            yield
        finally:
            self._state = self._get_default()
            self._set_default(shared)

    def state_dict(self) -> dict:
        return {"device": str(self.device), "state": self._state.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._state = state["state"].clone()

    @contextlib.contextmanager
    def replay_from(self, state: torch.Tensor):
        """Run the body with the TP stream rewound to `state`, then put the current one back.

        Activation recomputation needs this: the recomputed forward must draw the dropout
        masks the original forward drew, and afterwards the stream continues as if it had not run.
        """
        current = self._state
        self._state = state
        try:
            yield
        finally:
            self._state = current

    def snapshot(self) -> torch.Tensor:
        return self._state.clone()
