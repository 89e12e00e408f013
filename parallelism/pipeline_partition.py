"""How many transformer blocks each pipeline stage runs.

The first stage also runs the embedding and the last the tied output layer and the loss, so when
blocks do not divide evenly the extra ones go to the middle stages first. For BLOOM-176B (70
blocks, 12 stages) this gives 5, 6 x 10, 5: the split BigScience used.
"""
from typing import List


def stage_layer_counts(num_layers: int, pp: int) -> List[int]:
    if pp < 1 or num_layers < pp:
        raise ValueError(f"cannot split {num_layers} layers over {pp} pipeline stages")
    counts = [num_layers // pp] * pp
    extra = num_layers % pp
    order = list(range(1, pp - 1)) + [0, pp - 1] if pp > 2 else list(range(pp))
    for stage in order[:extra]:
        counts[stage] += 1
    return counts
