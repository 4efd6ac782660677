"""``SplitOptimizer``: one optimizer made of parts — projector, inner rule, residual rule, refresh schedule.

For a projected 2-D parameter with gradient G (canonical orientation Gt, (d, D), see ``projectors``), one step is

    every ``update_gap`` steps:  P <- projector.refresh(G); moments kept / reset / rotated by R = P_new^T P_old
    g = P^T Gt                                   (r, D)   projected gradient
    u = inner(g)                                 (r, D)   stateful direction (Adam/AdamW/SGD-momentum)
    W <- W - lr * scale * P u                             GaLore's update, alpha = ``scale``
    W <- W - lr * residual_lr_scale * rho(Gt - P g)       residual rule rho: drop / fira / signsgd / sgd
                                                          (Fira's code subtracts scale * P g instead; APOLLO's
                                                          rho scales Gt itself, and replaces the P u update)

Block selectors (``block``, ``layers``) replace P by all-or-nothing per parameter: a selected block gets the inner
rule on its full gradient (times ``scale``), the others only the residual rule; with ``residual="drop"`` an inactive
block is frozen (no update, no weight decay). Coordinate subsets (``randk``, ``columns``, ``rows``) keep a random set
of entries / columns / rows of the (m, n) gradient itself (FRUGAL's ``CoordinateProjector``). Parameters that are
not projected (1-D ones, and any group with ``project=False``) get the inner rule on their full gradient — with
``inner="adamw"`` that is exactly ``torch.optim.AdamW``, with ``inner="adamw_hf"`` transformers' ``AdamW``
(galore-torch's and Fira's arithmetic).

Weight decay: ``adam`` / ``sgd`` add ``wd * W`` to the gradient (L2); ``adamw`` scales ``W <- W (1 - lr wd)`` before
the update (torch); ``adamw_hf`` applies ``W <- W - lr wd W`` to the updated weights (transformers).

``step()`` updates what ``batched.py`` covers in batches (``bmm`` over matrices of one shape, ``torch._foreach_*``
over the rest; the same arithmetic, bit-exact on the CPU) and everything else one param at a time (``_update``, also
the layer-wise hooks' path); ``SplitOptimizer.batched = False`` turns batching off.

``state_bits=8`` / ``4`` stores every inner rule's moments (of projected and plain params alike) block-wise quantized
between steps, fp32 during the step (``lowbit``: 8-bit Adam's dynamic-map quantization, arXiv 2110.02861).

Every option is also a param-group key, so groups can differ (e.g. embeddings plain, attention projected). ``lr``
stays in ``param_groups`` for LR schedulers. ``layerwise=True`` runs each parameter's update inside a
post-accumulate-grad hook and frees its gradient right away (GaLore's per-layer weight update, arXiv 2403.03507
Sec. 4.3), so the full set of gradients is never alive at once; ``step()`` is then a no-op and gradient clipping has no
effect (no gradient survives backward). Gradient accumulation: while ``accumulating`` is True (the training loop sets
it for every micro-batch but the last) the hooks leave the gradients to accumulate, so the update runs once, on the
summed gradient (galore-torch #78 updates on every micro-batch). Under FSDP2 the hooks fire on the *sharded* parameter
right after its reduce-scatter (``fully_shard`` calls post-accumulate-grad hooks there).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import RankwiseError
from .batched import batched_step
from . import lowbit
from .blocks import BLOCK_SELECTORS, ORDERS, make_selector
from . import sharded
from .projectors import COORDINATE_SUBSETS, PROJECTORS, SIDES, Projector, make_projector, orient
from .projectors import mix as _mix
from .rules import INNER_RULES, RESIDUAL_RULES, InnerRule, make_inner, make_residual

MOMENT_POLICIES = ("keep", "reset", "rotate")


class SplitOptimizer(torch.optim.Optimizer):
    """Low-rank / block-sparse stateful updates plus a state-free residual, as a ``torch.optim.Optimizer``.

    Args (all also valid as param-group keys):
        projector: ``svd``, ``rsvd``, ``random``, ``gaussian`` (APOLLO's), ``coordinates`` (per matrix, canonical
            orientation), ``randk``, ``columns``, ``rows`` (coordinate subsets of the gradient) or ``block``,
            ``layers`` (per block).
        inner: ``adamw`` (torch's arithmetic), ``adamw_hf`` (transformers', as in galore-torch / Fira), ``adam`` or
            ``sgd`` (momentum) — the stateful rule.
        residual: ``drop``, ``fira`` (Fira's code), ``fira_exact`` (its residual is G - P P^T G), ``signsgd``,
            ``sgd`` — the rule on the part outside the subspace — or ``apollo`` / ``apollo_tensor`` (APOLLO's
            channel- / tensor-wise scaling of the raw gradient, times sqrt(``scale``), instead of ``scale * P u``).
        rank: subspace dimension r, 1 <= r <= min(m, n) for every projected matrix.
        density: FRUGAL's rho, instead of ``rank``/``active_blocks`` when set: rank = round(rho min(m, n)) per matrix;
            int(rho length) entries / columns / rows for coordinate subsets; round(rho n) of the n blocks.
        update_gap: steps between refreshes of the subspace / block selection (GaLore's ``update_proj_gap``).
        scale: multiplier alpha of the back-projected inner update (GaLore's ``scale``; 0.25 in its recipe); for
            ``apollo`` rules apollo-torch's ``scale``, the update times sqrt(scale).
        moments: on refresh, ``keep`` (GaLore, Fira), ``reset`` (FRUGAL, BAdam) or ``rotate`` into the new
            basis (m <- R m, v <- (R*R) v, R = P_new^T P_old). Block selectors: ``reset`` frees an inactive block's
            moments, ``keep`` leaves them untouched until it is selected again (LISA).
        residual_lr_scale: residual learning rate / lr (FRUGAL's ``inactive_lr_scale``).
        lr, betas, eps, weight_decay, momentum, nesterov: as in ``torch.optim`` (decoupled decay for ``adamw``,
            after the update for ``adamw_hf``).
        stagger: refresh the group's projected matrices at staggered steps (the j-th of n at t = j * gap // n
            (mod gap), and at t = 0) instead of all at once: the refresh work (SVDs) is spread over the steps, no
            step-time spike every ``update_gap`` steps; off in every preset (their references refresh together).
        power_iters, oversample: ``rsvd`` settings. block_order (``blocks.ORDERS``), active_blocks: block selector
            settings; block_phase: steps by which the first period is shorter (at most update_gap - 1; BAdam's
            switch after step k when (k + 1) % switch_block_every == 0 is phase 1). seed: seeds random bases,
            coordinates and block sampling (resume is bit-exact).
        project: per group; False = plain inner rule on full gradients. names / blocks: per group, one per param
            (error messages; block ids for ``block``/``layers``, default one block per param). block_ids: per group,
            the ids the selector chooses from (default: those of the group; groups sharing them share the choice).
        state_bits: None (moments in the param's dtype), 8 or 4: moments of >= 4096 entries stored block-wise
            quantized (``lowbit``; 8: bitsandbytes, 4: torchao), smaller ones in fp32.
        side: ``auto`` (the basis spans the smaller side, GaLore's rule) or ``shard`` (always the right side, n x r:
            a weight sharded by rows under FSDP2 then projects, keeps its moments and back-projects locally;
            ``rsvd`` refreshes by a distributed range finder; see ``rankwise.optim.sharded``).
        basis: with ``side="shard"`` (``svd``, ``rsvd``), where the basis Q (n x r) lives between steps under FSDP2:
            ``replicated`` (whole on every rank, no per-step collective) or ``sharded`` (``Shard(0)``, n/N rows per
            rank, so that the state per rank is the single-process state / N; all-gathered (n x r) for the step
            that uses it, then freed). The same numbers either way; a no-op on plain tensors (one process, DDP).
        layerwise: update in post-accumulate-grad hooks (see module docstring).
    """

    batched = True  # step() batches what ``batched.py`` covers; False: every param through ``_update``

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], projector: str = "svd",
                 inner: str = "adamw", residual: str = "drop", rank: int = 128, update_gap: int = 200,
                 scale: float = 1.0, density: float | None = None, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.9, nesterov: bool = False, moments: str = "keep",
                 residual_lr_scale: float = 1.0, power_iters: int = 2, oversample: int = 8,
                 block_order: str = "ascending", active_blocks: int = 1, block_phase: int = 0, seed: int = 0,
                 project: bool = True, state_bits: int | None = None, stagger: bool = False,
                 layerwise: bool = False, side: str = "auto", basis: str = "replicated"):
        self._index: dict[nn.Parameter, int] = {}
        self._block: dict[nn.Parameter, int] = {}
        self._slot: dict[nn.Parameter, tuple[int, int]] = {}  # (j, n): j-th of the group's n refreshed matrices
        self._group_of: dict[nn.Parameter, dict[str, Any]] = {}
        self._selection: dict[int, tuple[int, set[int]]] = {}  # id(group) -> (period, active block ids)
        defaults = dict(projector=projector, inner=inner, residual=residual, rank=rank, update_gap=update_gap,
                        scale=scale, density=density, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        momentum=momentum, nesterov=nesterov, moments=moments, residual_lr_scale=residual_lr_scale,
                        power_iters=power_iters, oversample=oversample, block_order=block_order,
                        active_blocks=active_blocks, block_phase=block_phase, seed=seed, project=project,
                        state_bits=state_bits, stagger=stagger, side=side, basis=basis)
        super().__init__(params, defaults)
        self.layerwise = layerwise
        self.accumulating = False  # layer-wise: True on micro-batches whose gradients must accumulate (no update)
        self._hooks = []
        if layerwise:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))

    # ----------------------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate(group)
        blocks = group.pop("blocks", None) or list(range(len(group["params"])))
        if len(blocks) != len(group["params"]):
            raise RankwiseError(f"param group 'blocks' has {len(blocks)} entries for {len(group['params'])} params")
        names = group.get("names") or [None] * len(group["params"])
        for p, b, name in zip(group["params"], blocks, names):
            self._index[p] = len(self._index)
            self._block[p] = b
            self._group_of[p] = group
            if self._projected(p, group) and group["projector"] in PROJECTORS:
                d, r = min(p.shape), self._rank(p, group)
                if not 1 <= r <= d:
                    label = name or f"param #{self._index[p]}"
                    what = f"rank {r}" if group["density"] is None else f"density {group['density']} (rank {r})"
                    raise RankwiseError(f"{what} is invalid for {label} of shape {tuple(p.shape)}: the rank must be "
                                        f"between 1 and min(m, n) = {d}; pass a smaller rank, or put this "
                                        "parameter in a param group with project=False")
            if self._projected(p, group) and group["projector"] in COORDINATE_SUBSETS:
                sub = COORDINATE_SUBSETS[group["projector"]]
                if sub.dim != 1 and sharded.is_dtensor(p):
                    raise RankwiseError(f"projector {group['projector']!r} cannot run on FSDP-sharded parameters "
                                        f"({name or 'param #' + str(self._index[p])}): its kept {sub.unit} are "
                                        "indexed across the rows FSDP splits over the ranks; use projector "
                                        "'columns' (FRUGAL's default coordinate mode), a subspace projector with "
                                        "side='shard', or --parallel ddp")
                k, length = sub.count(p.shape, group["rank"], group["density"]), sub.length(p.shape)
                if not 1 <= k <= length:
                    label = name or f"param #{self._index[p]}"
                    raise RankwiseError(f"projector {group['projector']!r} keeps {k} of the {length} "
                                        f"{sub.unit} of {label} (shape {tuple(p.shape)}); it must keep between 1 and "
                                        f"{length}: change rank or density")
        refreshed = [p for p in group["params"] if self._projected(p, group) and group["projector"] not in
                     BLOCK_SELECTORS]
        self._slot.update({p: (j, len(refreshed)) for j, p in enumerate(refreshed)})
        ids = group.get("block_ids") or sorted(set(blocks))
        if not set(blocks) <= set(ids):
            raise RankwiseError(f"param group 'blocks' has ids {sorted(set(blocks) - set(ids))} missing from its "
                                "'block_ids'")
        group["block_ids"] = sorted(ids)
        if group["projector"] in BLOCK_SELECTORS and group["project"]:  # a count that selects nothing fails here
            make_selector(group["projector"], group["block_order"], group["active_blocks"], group["density"],
                          len(ids)).active(group["block_ids"], 0, group["seed"])
        self._selection = {}

    @staticmethod
    def _validate(group: dict[str, Any]) -> None:
        def choice(key: str, valid: Iterable[str]) -> None:
            if group[key] not in valid:
                raise RankwiseError(f"unknown {key} {group[key]!r}; valid: {', '.join(valid)}")

        choice("projector", [*PROJECTORS, *COORDINATE_SUBSETS, *BLOCK_SELECTORS])
        choice("inner", INNER_RULES)
        choice("residual", RESIDUAL_RULES)
        choice("moments", MOMENT_POLICIES)
        choice("block_order", ORDERS)
        lowbit.check(group["state_bits"])
        choice("side", SIDES)
        choice("basis", sharded.BASES)
        if group["project"]:
            sharded.check_basis(group["basis"], group["side"], group["projector"])
        for key in ("update_gap", "active_blocks", "power_iters"):
            if not isinstance(group[key], int) or group[key] < 1:
                raise RankwiseError(f"{key} must be a positive integer, got {group[key]!r}")
        for key in ("lr", "eps", "weight_decay", "residual_lr_scale", "oversample", "momentum", "scale"):
            value = group[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (key == "scale"
                                                                                               and value == 0):
                raise RankwiseError(f"{key} must be a {'positive' if key == 'scale' else 'non-negative'} number, "
                                    f"got {value!r}")
        if not isinstance(group["rank"], int) or group["rank"] < 1:
            raise RankwiseError(f"rank must be a positive integer, got {group['rank']!r}")
        rho = group["density"]
        if rho is not None and (isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1):
            raise RankwiseError(f"density must be a number in (0, 1] (or None to use rank), got {rho!r}")
        if not isinstance(group["block_phase"], int) or group["block_phase"] < 0:
            raise RankwiseError(f"block_phase must be a non-negative integer, got {group['block_phase']!r}")
        kind = ("block selector" if group["projector"] in BLOCK_SELECTORS else
                "coordinate subset" if group["projector"] in COORDINATE_SUBSETS else None)
        if kind is not None and RESIDUAL_RULES[group["residual"]].needs_subspace:
            raise RankwiseError(f"residual {group['residual']!r} needs a subspace projector "
                                f"({', '.join(PROJECTORS)}), not the {kind} {group['projector']!r}")
        if not isinstance(group["stagger"], bool):
            raise RankwiseError(f"stagger must be True or False, got {group['stagger']!r}")
        if group["projector"] in BLOCK_SELECTORS and group["stagger"]:
            raise RankwiseError(f"stagger spreads the refreshes of projected matrices; the block selector "
                                f"{group['projector']!r} switches all blocks at once: use block_phase to shift it")
        if group["projector"] in BLOCK_SELECTORS and group["moments"] == "rotate":
            raise RankwiseError(f"block selector {group['projector']!r} has no basis to rotate moments into: use "
                                "moments='reset' (free an inactive block's moments) or 'keep' (keep them)")

    @staticmethod
    def _rank(p: torch.Tensor, group: dict[str, Any]) -> int:
        """r of a projected matrix: ``rank``, or round(density * min(m, n)) (FRUGAL's ``GaLoreProjector``)."""
        return group["rank"] if group["density"] is None else round(group["density"] * min(p.shape))

    @staticmethod
    def _projected(p: torch.Tensor, group: dict[str, Any]) -> bool:
        if not group["project"]:
            return False
        return p.dim() == 2 or group["projector"] in BLOCK_SELECTORS

    # ------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter with a gradient (in layer-wise mode the hooks did it: none is left)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # layer-wise: the hooks have consumed the gradients (only DCP's state-init
            # step, which sets zero gradients outside backward, finds some)
            params = [p for p in group["params"] if p.grad is not None]
            for p in batched_step(self, group, params) if self.batched and not self.layerwise else params:
                self._update(p, group)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim``'s, but integer tensors (``coordinates`` indices, low-bit codes) and, with
        ``state_bits``, every tensor keep their saved dtype (torch casts every tensor of a floating-point param's
        state to the param's dtype)."""
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, (p, low) in zip(ids, ((p, g.get("state_bits")) for g in self.param_groups for p in g["params"])):
            for key, value in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(value) and (low is not None or not value.is_floating_point()):
                    self.state[p][key] = value.to(p.device, copy=True)
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._selection = {}

    def _hook(self, p: torch.Tensor) -> None:
        if self.accumulating:
            return
        with torch.no_grad():
            self._update(p, self._group_of[p])
        p.grad = None

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        g = p.grad
        if g.is_sparse:
            raise RankwiseError("SplitOptimizer does not support sparse gradients; use dense embeddings "
                                "(sparse=False) or torch.optim.SparseAdam for them")
        if g.is_complex():
            raise RankwiseError("SplitOptimizer does not support complex gradients; optimize the real and "
                                "imaginary parts as separate real parameters (torch.view_as_real)")
        state = self.state[p]
        t = state.get("updates", 0)
        if self._frozen(p, group, state, t):  # an inactive block under residual 'drop': untouched, not even decayed
            state["updates"] = t + 1
            return
        inner = make_inner(group["inner"])
        transposed = self._projected(p, group) and group["projector"] in PROJECTORS and p.shape[0] >= p.shape[1]
        lowbit.unpack(state, inner.moments, inner.unsigned, transposed)  # quantized moments -> fp32 for this step
        lr, wd = group["lr"], group["weight_decay"]
        if wd and not inner.decay_after:
            if inner.coupled_decay:
                g = g.add(p, alpha=wd)
            else:
                p.mul_(1 - lr * wd)
        if not self._projected(p, group):
            if "step" not in state:
                inner.init(state, g)
            self._whole(p, g, state, group, inner, lr)
        elif group["projector"] in BLOCK_SELECTORS:
            self._block_update(p, g, state, group, inner, t)
        elif group["projector"] in COORDINATE_SUBSETS:
            with sharded.plain_as_replicated(g):  # the kept indices are the same on every rank
                self._coordinate_update(p, g, state, group, inner, t)
        else:
            self._subspace_update(p, g, state, group, inner, t)
        if wd and inner.decay_after:
            p.add_(p, alpha=-lr * wd)
        lowbit.pack(state, inner.moments, inner.unsigned, transposed, group.get("state_bits"))
        state["updates"] = t + 1

    def _schedule(self, p: torch.Tensor, group: dict[str, Any], t: int) -> tuple[bool, int]:
        """(refresh at update ``t``?, period) of a projected matrix or coordinate subset: every ``update_gap`` steps
        from update 0; with ``stagger``, the j-th of the group's n such params refreshes at updates t = o_j + k gap,
        o_j = j * gap // n (and at update 0, when it has no basis yet), so refreshes spread over the gap."""
        gap = group["update_gap"]
        j, n = self._slot[p]
        shift = -(j * gap // n) % gap if group.get("stagger") else 0  # .get: checkpoints from before the option
        period, offset = divmod(t + shift, gap)
        return t == 0 or offset == 0, period

    @staticmethod
    def _whole(p: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any], inner: InnerRule,
               lr: float) -> None:
        """p <- p - lr * inner(g) for a whole gradient: the rule's fused ``apply_`` (what the batched step does), or
        with quantized moments (fp32 during the step, ``state_bits``) the direction cast to the gradient's dtype."""
        if group.get("state_bits"):
            p.add_(inner.direction(g, state, group), alpha=-lr)
        else:
            inner.apply_([p], [g], [state], group, lr)

    @staticmethod
    def _period(group: dict[str, Any], t: int) -> tuple[int, int]:
        """(period, step within it) of update ``t`` (0-based) for a block selector, with ``block_phase``."""
        gap = group["update_gap"]
        return divmod(t + min(group["block_phase"], gap - 1), gap)

    def _active(self, group: dict[str, Any], period: int) -> set[int]:
        """The block ids selected in ``period`` (cached per group: every param of a step asks for the same)."""
        cached = self._selection.get(id(group))
        if cached is None or cached[0] != period:
            ids = group["block_ids"]
            selector = make_selector(group["projector"], group["block_order"], group["active_blocks"],
                                     group["density"], len(ids))
            cached = self._selection[id(group)] = (period, selector.active(ids, period, group["seed"]))
        return cached[1]

    def _frozen(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], t: int) -> bool:
        """True for a param of an inactive block when the residual rule is ``drop`` (its moments freed under
        ``moments="reset"``, left untouched under ``"keep"``)."""
        if group["projector"] not in BLOCK_SELECTORS or group["residual"] != "drop" or not self._projected(p, group):
            return False
        if self._block[p] in self._active(group, self._period(group, t)[0]):
            return False
        if group["moments"] == "reset":
            make_inner(group["inner"]).drop(state)
        return True

    def _block_update(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                      inner: InnerRule, t: int) -> None:
        """Selected block: inner rule on the full gradient, W <- W - lr * scale * u (moments fresh at each period
        under ``reset``). Inactive: W <- W - lr * residual_lr_scale * rho(G) (``drop`` never gets here)."""
        period, offset = self._period(group, t)
        if self._block[p] in self._active(group, period):
            if "step" not in state or (offset == 0 and group["moments"] == "reset"):
                inner.init(state, g)
            self._whole(p, g, state, group, inner, group["lr"] * group["scale"])
            return
        if group["moments"] == "reset":
            inner.drop(state)
        direction = make_residual(group["residual"]).direction(g, None, None, state, group)
        p.add_(direction, alpha=-group["lr"] * group["residual_lr_scale"])

    def _coordinate_update(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                           inner: InnerRule, t: int) -> None:
        """FRUGAL's RandK / column / row projection (``coordinate_projector.py``) on the (m, n) gradient G: every
        ``update_gap`` steps a random index set S is drawn; u = inner(G_S); W_S <- W_S - lr * scale * u and
        W <- W - lr * residual_lr_scale * rho(G with G_S = 0)."""
        sub = COORDINATE_SUBSETS[group["projector"]]
        refresh, period = self._schedule(p, group, t)
        if refresh:
            old = state.get("index")
            k = sub.count(p.shape, group["rank"], group["density"])
            state["index"] = sub.pick(p.shape, k, _mix(group["seed"], self._index[p], period), g.device)
        idx = state["index"]
        low = sub.down(g, idx)
        if "step" not in state:
            inner.init(state, low)
        elif refresh and group["moments"] == "reset":
            inner.reset(state)
        elif refresh and group["moments"] == "rotate":
            for key in inner.moments:
                state[key] = sub.carry(state[key], old, idx, p.shape)
        sub.add_(p, idx, inner.direction(low, state, group), -group["lr"] * group["scale"])
        if group["residual"] != "drop":
            resid = sub.zero(g, idx)
            direction = make_residual(group["residual"]).direction(resid, low, None, state, group)
            p.add_(direction, alpha=-group["lr"] * group["residual_lr_scale"])

    def _subspace_update(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                         inner: InnerRule, t: int) -> None:
        proj: Projector = make_projector(group["projector"], self._rank(p, group), **(
            {"power_iters": group["power_iters"], "oversample": group["oversample"]}
            if group["projector"] == "rsvd" else {}))
        side = group["side"]
        gt = orient(g, side)
        d = gt.shape[0]
        refresh, period = self._schedule(p, group, t)
        keep = group.get("basis", "replicated") if side == "shard" else None  # .get: checkpoints from before it
        needed = not refresh or group["projector"] != "svd" or group["moments"] == "rotate"  # rsvd: warm start
        with sharded.whole_basis(state, keep, needed):  # basis="sharded": all-gathered here, sliced again after
            old = self._refresh(p, gt, state, group, proj, period) if refresh else None
            with sharded.plain_as_replicated(gt):
                self._project_and_apply(p, gt, state, group, inner, proj, d, refresh, old)

    def _refresh(self, p: torch.Tensor, gt: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                 proj: Projector, period: int) -> torch.Tensor | None:
        """A new basis for ``period`` into ``state``; returns the old one, dense, when ``moments="rotate"`` needs it."""
        side, d = group["side"], gt.shape[0]
        old = proj.dense(proj.handle(state, gt), d) if group["moments"] == "rotate" and "step" in state else None
        seed = proj.seed(state, group["seed"], self._index[p], period)
        if side == "shard" and group["projector"] == "rsvd":  # no gather: one n x k all-reduce per iteration
            sharded.refresh_rsvd(orient(p.grad, side), state, self._rank(p, group), group["oversample"],
                                 group["power_iters"], seed)
        else:
            with sharded.plain_as_replicated(gt):
                proj.refresh(p.grad, state, seed, side)
        return old

    def _project_and_apply(self, p: torch.Tensor, gt: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                           inner: InnerRule, proj: Projector, d: int, refresh: bool, old: torch.Tensor | None) -> None:
        h = proj.handle(state, gt)
        low = proj.down(gt, h)
        if "step" not in state:
            inner.init(state, low)
        elif refresh and group["moments"] == "reset":
            inner.reset(state)
        elif old is not None:
            inner.rotate(state, proj.dense(h, d).t() @ old)
        u = inner.direction(low, state, group)
        pt = orient(p, group["side"])
        lr, rls = group["lr"], group["residual_lr_scale"]
        residual = make_residual(group["residual"])
        c = None
        if group["residual"] != "drop":
            basis = proj.dense(h, d) if residual.needs_subspace else None
            c = residual.column_scale(gt, low, u, state, group, basis)
        a = residual.inner_weight(group)
        if c is None:
            pt.add_(proj.up(u, h, d), alpha=-lr * a)
            if group["residual"] != "drop":
                pt.add_(residual.direction(proj.residual(gt, low, h), low, u, state, group), alpha=-lr * rls)
            return
        # linear residual rule: scale P u + rls (Gt - w P g) c = P (scale u - rls w g c) + rls Gt c
        w = residual.subspace_weight(group)
        if a or w:  # APOLLO: neither (the inner rule only feeds the scaling of Gt)
            pt.add_(proj.up(u.mul(a).sub_(low * c, alpha=rls * w), h, d), alpha=-lr)
        if isinstance(c, torch.Tensor):
            pt.addcmul_(gt, c, value=-lr * rls)
        else:
            pt.add_(gt, alpha=-lr * rls * c)

    # ------------------------------------------------------------------------------------------- memory
    def enter_period(self, period: int) -> None:
        """Make every parameter's next update the first of ``period``: update ``period * update_gap`` of its group
        (less ``block_phase`` for block selectors, whose first period is shorter); the state is left as it is. For
        the planner (``rankwise.plan(..., period=)``), whose meta steps visit periods 0..``period`` this way, one
        step each, so that the state counted is the state of ``period`` (its blocks; under ``moments="keep"`` those
        of every earlier period too) — never used in training."""
        for group in self.param_groups:
            gap = group["update_gap"]
            phase = min(group["block_phase"], gap - 1) if group["projector"] in BLOCK_SELECTORS else 0
            for p in group["params"]:
                self.state[p]["updates"] = max(0, period * gap - phase)

    def expected_state_bytes(self, period: int = 0) -> int:
        """Optimizer-state bytes from shapes alone (works on ``device="meta"``), for the selection of ``period``.

        Per parameter with element size s: a float32 ``step`` (4 B) with every set of moments; plain params
        k * numel * s (k = 2 for Adam/AdamW, 1 for SGD-momentum); projected (m, n), d = min, D = max:
        basis d * r * s (svd, rsvd) / 0 (random, gaussian: seed only) / 8 r (coordinates, int64 indices) + k * r * D * s
        (+ max(4, s) B for the limiter of ``fira``, ``apollo``); coordinate subsets: 8 B per kept index + k * kept entries * s + 4;
        block selectors: k * numel * s + 4 for params of the blocks selected in ``period`` (``moments="keep"``: in
        any period up to ``period``), else 0. With ``state_bits``, each moment's ``numel * s`` is
        ``lowbit.moment_bytes`` of its shape in the param's orientation (codes + fp32 absmax per block, or fp32).
        """
        total = 0
        for group in self.param_groups:
            k = len(INNER_RULES[group["inner"]].moments)
            bits = group.get("state_bits")
            active: set[int] = set()
            if group["projector"] in BLOCK_SELECTORS and group["project"]:
                ids = set(group["block_ids"])
                for past in range(period, -1 if group["moments"] == "keep" else period - 1, -1):
                    active |= self._active(group, past)
                    if active == ids:
                        break
            for p in group["params"]:
                s = p.element_size()
                full = k * lowbit.moment_bytes(tuple(p.shape), s, bits) + 4
                if not self._projected(p, group):
                    total += full
                elif group["projector"] in BLOCK_SELECTORS:
                    total += full if self._block[p] in active else 0
                elif group["projector"] in COORDINATE_SUBSETS:
                    sub = COORDINATE_SUBSETS[group["projector"]]
                    kept = sub.count(p.shape, group["rank"], group["density"])
                    total += 8 * kept + k * lowbit.moment_bytes(sub.shape(p.shape, kept), s, bits) + 4
                else:
                    d, big, r = min(p.shape), max(p.shape), self._rank(p, group)
                    if group["side"] == "shard":  # the right basis (n x r), moments r x m
                        d, big = p.shape[1], p.shape[0]
                    basis = {"svd": d * r * s, "rsvd": d * r * s, "random": 0, "gaussian": 0, "coordinates": 8 * r}
                    low = (big, r) if p.shape[0] >= p.shape[1] else (r, big)  # the param's orientation
                    total += basis[group["projector"]] + k * lowbit.moment_bytes(low, s, bits) + 4
                    total += max(4, s) * len(RESIDUAL_RULES[group["residual"]].state_keys)  # >= fp32 scalars
        return total
