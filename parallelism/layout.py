"""A 3D layout's sizes, without torch: the planner and the config checks reason about layouts
before any process group exists."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp
