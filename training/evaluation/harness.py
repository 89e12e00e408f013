"""The EleutherAI lm-evaluation-harness over our distributed model: `BloomHarnessLM`, registered
as lm_eval model "bloom-pretrain".

It scores requests with the model as it is laid out (any TP x PP x DP), without exporting it:
- every rank of the job holds an identical copy of the harness's requests (lm_eval sees a
  one-process model on each rank, so its task building, sorting and metrics are the same
  everywhere);
- requests are sorted and batched as lm_eval's HF model does, and the batches are dealt to DP
  replicas round-robin; inside a replica each batch goes through the pipeline stage by stage
  (blocking send/recv, as training/evaluation/evaluate.py does) and TP is the model's own;
- the last stage gathers only the continuation positions' vocab-parallel logits over TP and
  computes the log-probabilities as HFLM does (log_softmax over every padded row, the sum over
  the continuation, greedy = argmax equals it); the answers are all-gathered to every rank.

Tokenization, context/continuation splitting, the empty-context prefix token, left truncation to
`max_length` (data.seq_length: ALiBi has no position limit, but the model was trained on that
length) and rolling windows follow lm_eval's HFLM (lm_eval/models/huggingface.py, 0.4.13) and
TemplateLM, so the numbers agree with `lm_eval --model hf` on the exported directory
(tests/test_harness.py). Generation (generate_until) is not implemented: it raises, naming the
tasks that asked for it.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from megatron.core import parallel_state

from training.model.bloom import gather_logits

Request = Tuple[tuple, List[int], List[int]]  # ((context, continuation) or None, context ids, continuation ids)


@dataclass
class StageForward:
    """This rank's pipeline stage as a function: tokens (first stage) or hidden states in,
    hidden states or vocab-parallel logits (last stage) out."""
    forward: Callable[[torch.Tensor], torch.Tensor]
    first: bool
    last: bool
    dtype: torch.dtype  # of the hidden states passed between stages
    device: torch.device

    @classmethod
    def of_stage_model(cls, model, device) -> "StageForward":
        """bloom-eval's StageModel (training/evaluation/evaluate.py), read from a checkpoint."""
        return cls(model, model.stage.first, model.stage.last, next(model.parameters()).dtype, device)

    @classmethod
    def of_engine(cls, engine) -> "StageForward":
        """The running training engine (training/engine/engine.py): its PipelineModule stage
        when PP > 1, else the whole model through DeepSpeed (ZeRO-3 gathers weights as it goes)."""
        module = engine.module
        dtype = next(module.parameters()).dtype
        if engine.pipelined:
            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
            last = pp_rank == parallel_state.get_pipeline_model_parallel_world_size() - 1
            return cls(module, pp_rank == 0, last, dtype, engine.device)
        return cls(lambda tokens: engine.engine(tokens), True, True, dtype, engine.device)

    @torch.no_grad()
    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        """One batch through the pipeline; the vocab-parallel logits on the last stage, None
        elsewhere. Each hop sends its shape first: under sequence parallelism a stage holds
        1/TP of the sequence."""
        if self.first:
            x = tokens.to(self.device)
        else:
            src = parallel_state.get_pipeline_model_parallel_prev_rank()
            shape = torch.empty(3, dtype=torch.long)
            dist.recv(shape, src=src)
            x = torch.empty(*shape.tolist(), dtype=self.dtype, device=self.device)
            dist.recv(x, src=src)
        out = self.forward(x)
        if self.last:
            return out
        dst = parallel_state.get_pipeline_model_parallel_next_rank()
        dist.send(torch.tensor(out.shape, dtype=torch.long), dst=dst)
        dist.send(out.contiguous(), dst=dst)
        return None


def sorted_batches(requests: List[Request], batch_size: int) -> List[List[int]]:
    """Request indices in HFLM's order (longest first, then by tokens), cut into batches."""
    order = sorted(range(len(requests)),
                   key=lambda i: (-len(requests[i][1] + requests[i][2]), tuple(requests[i][1] + requests[i][2])))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def model_inputs(context: List[int], continuation: List[int], max_length: int) -> List[int]:
    """HFLM's causal input: context + continuation, left-truncated to max_length + 1 tokens, the
    last one dropped (it is only ever a target)."""
    return (context + continuation)[-(max_length + 1):][:-1]


@register_model("bloom-pretrain")
class BloomHarnessLM(TemplateLM):
    """lm_eval's LM interface over this job's model; every rank of the job calls it alike."""

    backend = "causal"

    def __init__(self, stage: StageForward, tokenizer, max_length: int, batch_size: int = 8):
        super().__init__()
        self.stage, self.info, self._max_length, self.batch_size = stage, tokenizer, max_length, batch_size
        bos = tokenizer._special_tokens().get("bos_token")  # tokenizer_config.json
        bos_id = tokenizer.tokenizer.token_to_id(bos) if bos else None
        # HFLM's prefix for an empty context: the tokenizer's BOS when it has one, else EOS.
        self._prefix = bos_id if bos_id is not None else tokenizer.eod
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()

    # -- lm_eval's tokenization interface -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.info.eod

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> List[int]:
        """HFLM.tok_encode: the tokenizer's post-processor applies unless told otherwise, and not
        to a string that already starts with the prefix token."""
        add = True if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith(self.tok_decode([self._prefix])):
            add = False
        ids = self.info.tokenizer.encode(string, add_special_tokens=add).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = False) -> str:
        return self.info.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # -- scoring --------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: List[Request], disable_tqdm: bool = False,
                              override_bs=None) -> List[Tuple[float, bool]]:
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        mine: Dict[int, Tuple[float, bool]] = {}
        for number, batch in enumerate(sorted_batches(requests, self.batch_size)):
            if number % dp_size == dp_rank:
                mine.update(zip(batch, self._score_batch([requests[i] for i in batch])))
        return self._gather(mine, len(requests))

    def _score_batch(self, batch: List[Request]) -> List[Tuple[float, bool]]:
        """(log-likelihood, is greedy) of each request; empty on all but the last stage."""
        for _, _, cont in batch:
            if not 0 < len(cont) <= self.max_length:  # HFLM asserts the same
                raise ValueError(f"a harness continuation of {len(cont)} tokens does not fit max_length "
                                 f"{self.max_length} (raise --seq-length)")
        inputs = [model_inputs(ctx, cont, self.max_length) for _, ctx, cont in batch]
        width = max(len(i) for i in inputs)
        width += -width % self.tp_size  # sequence parallelism splits the sequence over TP
        # Right padding (with token 0, as HFLM pads) cannot change earlier positions of a causal model.
        tokens = torch.tensor([i + [0] * (width - len(i)) for i in inputs], dtype=torch.long)
        logits = self.stage.run(tokens)
        if logits is None:
            return []
        # Only the continuation's positions leave this rank's vocabulary slice.
        rows = [logits[b, len(i) - len(cont):len(i)] for b, (i, (_, _, cont)) in enumerate(zip(inputs, batch))]
        full = gather_logits(torch.cat(rows).float())
        log_probs = F.log_softmax(full, dim=-1)
        answers, start = [], 0
        for _, _, cont in batch:
            part, target = log_probs[start:start + len(cont)], torch.tensor(cont, device=log_probs.device)
            start += len(cont)
            answers.append((float(part.gather(1, target[:, None]).sum()), bool((part.argmax(-1) == target).all())))
        return answers

    def _gather(self, mine: Dict[int, Tuple[float, bool]], count: int) -> List[Tuple[float, bool]]:
        """Every answer on every rank; one rank per replica (last stage, TP rank 0) contributes."""
        owner = self.stage.last and parallel_state.get_tensor_model_parallel_rank() == 0
        pieces = [None] * dist.get_world_size()
        dist.all_gather_object(pieces, mine if owner else {})
        merged = {k: v for piece in pieces for k, v in piece.items()}
        if sorted(merged) != list(range(count)):
            raise RuntimeError(f"{count} harness requests, {len(merged)} answered")
        return [merged[i] for i in range(count)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """HFLM's rolling windows (the prefix token, max_length tokens a window, context 1), every
        window of every request scored in one pass, summed per request."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                         prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (loglikelihood, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += loglikelihood
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
        tasks = sorted({getattr(r, "task_name", None) or "?" for r in requests})
        raise NotImplementedError(
            f"bloom-pretrain's harness model scores log-likelihoods only; task(s) {', '.join(tasks)} "
            "ask for generation (generate_until): evaluate them on the exported model with `lm_eval --model hf`")
