"""SwitchLoRA (Zhou et al. 2024, arXiv 2406.06564): ReLoRA's ``W + (alpha / r) B A`` whose rank vectors (rows of
``A``, columns of ``B``) are switched a few at a time for candidate vectors, at a frequency that decays over
training.

A switch of rows ``I`` of ``A`` for candidates ``c_I`` keeps the layer's function (paper, Sec. 3.1)::

    W <- W + (alpha / r) B[:, I] (A[I] - c_I),   A[I] <- c_I,   pool[old slots of I] <- old A[I]

and likewise for columns ``J`` of ``B``: ``W <- W + (alpha / r) (B[:, J] - c_J^T) A[J]``. The gradient of
``B[:, I]`` is ``(alpha / r) G A[I]^T``: it changes meaning when ``A[I]`` changes, so the *counterpart* slices
(``B[:, I]``, ``A[J]``) get their Adam moments and step counters reset and are frozen for ``frozen_steps`` steps;
every other moment is kept. Switch counts follow the reference code (asfsdsf/SwitchLoRA,
``switchlora/switch_lora.py``): ``k_t = r / interval_t`` stochastically rounded, ``interval_t = interval_0 /
0.3^((t + 1) / descent_steps)``, rows taken cyclically from a pointer (A's and B's pointers start r/2 apart), their
candidates cyclically from a pool of ``C = min(in, out)`` vectors per factor, ``k_t`` capped so neither pointer
reaches the slices the other factor's switches froze.

Everything here is batched over the rank: fixed-shape masks and gathers over all ``r`` indices, no Python loop over
ranks and no device-to-host synchronisation (``k_t`` is capped on the device).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import ReLoRALinear


def init_bounds(in_features: int, out_features: int, rank: int) -> tuple[float, float]:
    """U(-b, b) bounds of ``A`` and ``B`` (paper Sec. 3.3; reference ``lora_utils.get_init_lora_bound``).

    With gain ``g = sqrt(1/3)`` (kaiming_uniform's, a = sqrt(5)): ``std_A = (sqrt(m) r / n^1.5)^(1/4) g^(1/2)``,
    ``std_B = (r / sqrt(m n))^(1/4) g^(1/2)``, so that ``(1/r) B A`` has the variance ``g^2 / n`` of a dense init and
    ``B dA``, ``dB A`` move the product alike."""
    m, n, r = out_features, in_features, rank
    gain = math.sqrt(2.0 / (1 + 5))
    std_a = (m ** 0.5 * r / n ** 1.5) ** 0.25 * gain ** 0.5
    std_b = (r / (m * n) ** 0.5) ** 0.25 * gain ** 0.5
    return math.sqrt(3.0) * std_a, math.sqrt(3.0) * std_b


class SwitchLoRALinear(ReLoRALinear):
    """``y = x W^T + (alpha / r) x (B A)^T + b`` with ``W`` frozen and candidate pools for the rank vectors.

    Buffers (saved with the model, so a resume is exact): ``candidates_A`` (C x in) and ``candidates_B`` (C x out),
    drawn U(-b, b) like the factors; ``selected_A`` / ``selected_B`` (r,): the pool slot each row of ``A`` / column of
    ``B`` came from; ``frozen_A`` / ``frozen_B`` (r,): steps each slice stays frozen; ``pointer`` (2,): the next row
    of ``A`` / column of ``B`` to switch. Init as the reference: ``A``, ``B`` are the pool's last ``r`` vectors (B's
    rotated by r/2) and ``W = W_0 - (alpha / r) B A``, so the layer starts as the dense ``W_0``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 1.0):
        super().__init__(base, rank, alpha)
        n, m = self.in_features, self.out_features
        pool = min(m, n)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        ikw = {"device": base.weight.device, "dtype": torch.long}
        bound_a, bound_b = init_bounds(n, m, rank)
        self.register_buffer("candidates_A", torch.empty(pool, n, **kw))
        self.register_buffer("candidates_B", torch.empty(pool, m, **kw))
        last = torch.arange(pool - rank, pool, **ikw)
        self.register_buffer("selected_A", last.clone())
        self.register_buffer("selected_B", last.roll(rank // 2))
        self.register_buffer("frozen_A", torch.zeros(rank, **ikw))
        self.register_buffer("frozen_B", torch.zeros(rank, **ikw))
        self.register_buffer("pointer", torch.tensor([0, rank // 2], **ikw))
        if self.weight.device.type == "meta":
            return
        with torch.no_grad():
            self.candidates_A.uniform_(-bound_a, bound_a)
            self.candidates_B.uniform_(-bound_b, bound_b)
            self.lora_A.copy_(self.candidates_A[self.selected_A])
            self.lora_B.copy_(self.candidates_B[self.selected_B].t())
            self.weight.addmm_(self.lora_B, self.lora_A, alpha=-self.scale)

    @torch.no_grad()
    def switch(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Switch up to ``count`` rows of ``A`` and as many columns of ``B``, keeping ``W + s B A`` unchanged.

        Returns the (r,) masks of the switched rows of ``A`` and columns of ``B``: the counterparts to reset and
        freeze are ``B[:, rows]`` and ``A[cols]``. ``count`` is capped (on the device) at
        ``min((p_A - #frozen_A - p_B) mod r, (p_B - #frozen_B - p_A) mod r)`` as in the reference.
        """
        r = self.rank
        p_a, p_b = self.pointer[0], self.pointer[1]
        room = torch.minimum((p_a - (self.frozen_A > 0).sum() - p_b) % r, (p_b - (self.frozen_B > 0).sum() - p_a) % r)
        k = room.clamp(max=count)
        rows = self._switch(self.lora_A, self.candidates_A, self.selected_A, p_a, k, self.lora_B, rows=True)
        cols = self._switch(self.lora_B.t(), self.candidates_B, self.selected_B, p_b, k, self.lora_A.t(), rows=False)
        self.pointer.add_(k).remainder_(r)
        return rows, cols

    def _switch(self, mat: torch.Tensor, pool: torch.Tensor, selected: torch.Tensor, ptr: torch.Tensor,
                k: torch.Tensor, other: torch.Tensor, rows: bool) -> torch.Tensor:
        """Rows ``ptr, ptr+1, ... (mod r)``, ``k`` of them, of ``mat`` (A, or B^T) take the pool slots that follow
        the slot of row ``ptr - 1`` (mod C); ``W`` absorbs the difference through ``other`` (B, or A^T)."""
        r, size = self.rank, pool.shape[0]
        offset = (torch.arange(r, device=mat.device) - ptr) % r
        mask = offset < k
        dest = (selected.index_select(0, ((ptr - 1) % r).view(1)) + 1 + offset) % size
        new = torch.where(mask.unsqueeze(1), pool[dest], mat)  # gather before the pool is written
        delta = mat - new  # zero outside the switched rows
        if rows:  # W += s B (A - A')
            self.weight.addmm_(other, delta, alpha=self.scale)
        else:  # W += s (B - B') A, with mat = B^T and other = A^T
            self.weight.addmm_(delta.t(), other.t(), alpha=self.scale)
        pool.index_copy_(0, selected, torch.where(mask.unsqueeze(1), mat, pool[selected]))
        mat.copy_(new)
        selected.copy_(torch.where(mask, dest, selected))
        return mask

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, candidates={self.candidates_A.shape[0]}"


def switch_rate(step: int, descent_steps: int) -> float:
    """The switching frequency relative to the start: ``0.3^((t + 1) / descent_steps)``, floored at 1e-8
    (reference ``_get_switch_rate``, exponential type; it is 0.3 at ``t + 1 = descent_steps``)."""
    return max((0.3 ** (1.0 / descent_steps)) ** (step + 1), 1e-8)


def switch_count(rank: int, step: int, interval: float, descent_steps: int, u: float) -> int:
    """Vectors to switch at update ``step`` (0-based): ``rank / interval_t`` with ``interval_t = interval /
    switch_rate(t)``, rounded up with probability equal to its fractional part (``u`` ~ U[0, 1))."""
    expected = rank / (interval / switch_rate(step, descent_steps))
    return int(expected) + (1 if u < expected - int(expected) else 0)
