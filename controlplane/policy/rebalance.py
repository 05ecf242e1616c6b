"""A targeted rebalance of one congested stage: its boundary unit moves to the lighter neighbour. Pure."""

from __future__ import annotations


def rebalanced_layout(stage_units: list[list[str]], congested: int, neighbour_load: list[float]) -> list[str] | None:
    """The layout (``first..last`` ranges) after moving one unit of stage ``congested`` across the boundary it
    shares with its less loaded neighbour (by ``neighbour_load[k]``, e.g. queue length); None when the stage
    has a single unit or no neighbour. Units keep their order, so every unit stays in exactly one stage."""
    stages = [list(units) for units in stage_units]
    if len(stages[congested]) < 2 or len(stages) < 2:
        return None
    sides = [k for k in (congested - 1, congested + 1) if 0 <= k < len(stages)]
    lighter = min(sides, key=lambda k: (neighbour_load[k], k))
    if lighter < congested:
        stages[lighter].append(stages[congested].pop(0))
    else:
        stages[lighter].insert(0, stages[congested].pop())
    return [f"{units[0]}..{units[-1]}" for units in stages]
