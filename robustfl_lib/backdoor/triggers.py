"""Triggers and the clients that plant them: :class:`PixelTrigger`, :func:`poison`, :class:`BackdoorPoisoning`;
the distributed backdoor :class:`DBA`, whose clients each stamp one :class:`TriggerPart`.

Chapter ``11_exercise_backdoor_detection``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from ..byzantine import DataPoisoning
from ..runtime import make_generator

__all__ = ["PixelTrigger", "poison", "BackdoorPoisoning", "TriggerPart", "DBA"]


class PixelTrigger:
    """A ``size`` x ``size`` square of value ``value`` in the bottom-right corner (inset by ``margin``).

    ``trigger(x)`` stamps a batch ``(N, C, H, W)`` (a copy; ``x`` is unchanged).
    """

    def __init__(self, target: int = 0, size: int = 2, value: float = 1.0, margin: int = 0):
        if size < 1 or margin < 0:
            raise ValueError(f"need size >= 1 and margin >= 0, got {size}, {margin}")
        self.target, self.size, self.value, self.margin = int(target), int(size), float(value), int(margin)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        r0, c0 = self._origin(x)
        out = x.clone()
        out[..., r0 : r0 + self.size, c0 : c0 + self.size] = self.value
        return out

    def _origin(self, x: torch.Tensor) -> tuple[int, int]:
        """The square's top-left pixel in images shaped like ``x`` (which must hold it)."""
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__} expects (N, C, H, W) images, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if self.size + self.margin > min(h, w):
            raise ValueError(f"a {self.size}-pixel trigger with margin {self.margin} does not fit {h}x{w} images")
        return h - self.margin - self.size, w - self.margin - self.size

    def __repr__(self) -> str:
        return f"PixelTrigger(target={self.target}, size={self.size}, value={self.value}, margin={self.margin})"


def poison(
    x: torch.Tensor, y: torch.Tensor, trigger: PixelTrigger, fraction: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A backdoor client's training set: ``fraction`` of its samples stamped and relabelled ``trigger.target``.

    The rest stay clean, so the poisoned model keeps its main-task accuracy,
    which is what makes a backdoor hard to notice.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k = int(round(fraction * len(x)))
    idx = torch.randperm(len(x), generator=generator)[:k].to(x.device)
    x, y = x.clone(), y.clone()
    x[idx] = trigger(x[idx])
    y[idx] = trigger.target
    return x, y


class BackdoorPoisoning(DataPoisoning):
    r"""Backdoor clients for the FL loop: ``FLConfig(byzantine_attack=BackdoorPoisoning(trigger, fraction, boost))``.

    Each Byzantine client trains honestly on its data with ``fraction`` of it
    stamped by ``trigger`` and relabelled ``trigger.target`` (:func:`poison`),
    then the FL loop multiplies its update :math:`u` by ``boost`` :math:`\gamma`
    before sending it: model replacement (Bagdasaryan et al. 2020). With
    :math:`b` attackers among :math:`n` clients averaged by the mean,
    :math:`\gamma \approx n / b` makes the attackers' share of the aggregate as
    large as the whole honest step, so the backdoor is planted in few rounds.
    ``boost=1`` is plain data poisoning. The samples to poison are drawn from a
    generator seeded by ``seed``, so the same client data is poisoned the same
    way in every round and every run. Chapter ``11_exercise_backdoor_detection``.
    """

    def __init__(self, trigger: PixelTrigger, fraction: float = 0.5, boost: float = 1.0, seed: int = 0):
        if not isinstance(trigger, PixelTrigger):
            raise ValueError(f"trigger must be a PixelTrigger, got {type(trigger).__name__}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if not (math.isfinite(boost) and boost > 0):
            raise ValueError(f"boost must be a finite number > 0, got {boost}")
        self.trigger, self.fraction, self.boost, self.seed = trigger, float(fraction), float(boost), int(seed)

    def poison(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= self.trigger.target < num_classes:
            raise ValueError(f"trigger target {self.trigger.target} is not a class of a {num_classes}-class task")
        return poison(x, y, self.trigger, self.fraction, make_generator(self.seed))


class TriggerPart(PixelTrigger):
    """One rectangular block of a :class:`PixelTrigger`'s square: the pixels in rows
    ``rows = (r0, r1)`` and columns ``cols = (c0, c1)`` of the square (half-open, counted from
    the square's top-left pixel), stamped where the whole trigger would stamp them.

    The local trigger of one :class:`DBA` client; it keeps the whole trigger's ``target``,
    ``size``, ``value`` and ``margin`` (so it is a ``PixelTrigger`` wherever one is expected).
    Chapter ``11_exercise_backdoor_detection``.
    """

    def __init__(self, whole: PixelTrigger, rows: tuple[int, int], cols: tuple[int, int]):
        if not isinstance(whole, PixelTrigger):
            raise TypeError(f"whole must be a PixelTrigger, got {type(whole).__name__}")
        super().__init__(whole.target, whole.size, whole.value, whole.margin)
        for name, (lo, hi) in (("rows", rows), ("cols", cols)):
            if not 0 <= int(lo) < int(hi) <= whole.size:
                raise ValueError(f"{name} must be a range (lo, hi) with 0 <= lo < hi <= {whole.size}, got {(lo, hi)}")
        self.rows, self.cols = (int(rows[0]), int(rows[1])), (int(cols[0]), int(cols[1]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        r0, c0 = self._origin(x)
        out = x.clone()
        out[..., r0 + self.rows[0] : r0 + self.rows[1], c0 + self.cols[0] : c0 + self.cols[1]] = self.value
        return out

    def __repr__(self) -> str:
        return (f"TriggerPart(PixelTrigger(target={self.target}, size={self.size}, value={self.value}, "
                f"margin={self.margin}), rows={self.rows}, cols={self.cols})")


class DBA(BackdoorPoisoning):
    r"""Distributed backdoor attack (Xie, Huang, Chen & Li 2020, "DBA: Distributed Backdoor Attacks
    against Federated Learning", ICLR): the global trigger is split into :math:`k` local triggers,
    each colluding client poisons its data with its own part only, and the backdoor is tested with
    the global trigger.

    **Trigger.** The global trigger is ``trigger`` (a :class:`PixelTrigger` square of side
    :math:`s`); ``grid = (g_r, g_c)`` cuts it into :math:`k = g_r g_c` blocks (default
    :math:`2 \times 2`, the paper's four local triggers), row block :math:`a` spanning rows
    :math:`\lfloor a s / g_r \rfloor` to :math:`\lfloor (a+1) s / g_r \rfloor` of the square
    (columns alike), so the parts are disjoint and their union is the global trigger, pixel for
    pixel. ``parts[i]`` is block :math:`i` in row-major order (a :class:`TriggerPart`). The paper's
    local triggers are four bars with gaps between them; blocks of a solid square are the same
    construction on this library's trigger. Measure the attack with the *global* trigger:
    ``attack_success_rate(model, x, y, dba.trigger)``; each part alone is a weaker key.

    **Which client stamps which part.** The FL loop calls ``poison(x, y, num_classes)`` for every
    Byzantine client that trains, without saying which client it is. The :math:`j`-th distinct
    client that DBA sees gets part :math:`j \bmod k`, for the rest of the run; a client is
    recognised by ``client_id`` when the caller gives one, else by a digest of its clean data
    (``x`` and ``y``'s bytes: a client's partition is the same every round). In
    :func:`~robustfl_lib.run_federated` the attackers train in increasing client id, so in
    the first round the :math:`j`-th attacker by id gets part :math:`j`, and keeps it whether
    or not it takes part in later rounds. ``part=`` chooses the part explicitly. The
    assignment is the attack's state (``reset`` at a run's start, ``get_state``/``set_state``
    for checkpoints). Two clients with identical data would share a part.

    Each client stamps and relabels ``fraction`` of its samples (:func:`poison`, seeded by
    ``seed``) and its update is multiplied by ``boost`` (the paper's scale factor
    :math:`\gamma`; ``boost=1`` is plain poisoning). Requirements: ``grid`` two integers in
    ``[1, trigger.size]``; ``trigger.target`` a class of the task. Chapter
    ``11_exercise_backdoor_detection``.
    """

    def __init__(self, trigger: PixelTrigger, grid: tuple[int, int] = (2, 2), fraction: float = 0.5,
                 boost: float = 1.0, seed: int = 0):
        super().__init__(trigger, fraction, boost, seed)
        if isinstance(trigger, TriggerPart):
            raise ValueError("the global trigger must be a whole PixelTrigger, not a TriggerPart")
        if (not isinstance(grid, (tuple, list)) or len(grid) != 2
                or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)):
            raise ValueError(f"grid must be two integers (rows, cols), got {grid!r}")
        if not all(1 <= g <= trigger.size for g in grid):
            raise ValueError(f"each of grid {tuple(grid)} must be in [1, trigger.size={trigger.size}]")
        self.grid = (int(grid[0]), int(grid[1]))
        s = trigger.size
        row_edges = [a * s // self.grid[0] for a in range(self.grid[0] + 1)]
        col_edges = [b * s // self.grid[1] for b in range(self.grid[1] + 1)]
        self.parts = [TriggerPart(trigger, (row_edges[a], row_edges[a + 1]), (col_edges[b], col_edges[b + 1]))
                      for a in range(self.grid[0]) for b in range(self.grid[1])]
        self.reset()

    @property
    def num_parts(self) -> int:
        return len(self.parts)

    def reset(self) -> None:
        self._assigned: dict[str, int] = {}

    def get_state(self) -> dict[str, Any]:
        return {"clients": list(self._assigned), "parts": [self._assigned[k] for k in self._assigned]}

    def set_state(self, state: dict[str, Any]) -> None:
        self._assigned = {str(k): int(p) for k, p in zip(state["clients"], state["parts"])}

    def part_of(self, x: torch.Tensor, y: torch.Tensor, client_id: int | None = None) -> int:
        """The part this client stamps (assigned on first sight; see the class docstring)."""
        if client_id is not None:
            key = f"id:{int(client_id)}"
        else:
            digest = hashlib.blake2b(digest_size=16)
            for t in (x, y):
                digest.update(str((tuple(t.shape), t.dtype)).encode())
                digest.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
            key = f"data:{digest.hexdigest()}"
        if key not in self._assigned:
            self._assigned[key] = len(self._assigned) % self.num_parts
        return self._assigned[key]

    def poison(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, part: int | None = None,
               client_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= self.trigger.target < num_classes:
            raise ValueError(f"trigger target {self.trigger.target} is not a class of a {num_classes}-class task")
        if part is None:
            part = self.part_of(x, y, client_id)
        elif isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < self.num_parts:
            raise ValueError(f"part must be an integer in [0, {self.num_parts}), got {part!r}")
        return poison(x, y, self.parts[part], self.fraction, make_generator(self.seed))

    def __repr__(self) -> str:
        return (f"DBA(trigger={self.trigger!r}, grid={self.grid}, fraction={self.fraction}, boost={self.boost}, "
                f"seed={self.seed})")
