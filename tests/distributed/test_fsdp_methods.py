"""Every registered method under FSDP2 (2 gloo processes): it either runs and equals one process, or is refused
before anything is built, with one message naming the method and what runs instead."""

import pytest
import torch
import torch.multiprocessing as mp
from exact_helpers import config, losses, method_worker

from rankwise import methods as methods_mod
from rankwise.distributed import free_port
from rankwise.train import train

STEPS = 2
# the preset's default rank does not fit the mini model's 128-wide matrices
OPTIONS = {m: {"rank": 8} for m in ("apollo", "lost", "lowrank", "lowrank-rr", "relora", "sltrain", "switchlora")}
# refused under FSDP (Method.fsdp_refusal), with what runs instead
REFUSED = {"adalora": "--method lora", "altlora": "--method lora", "lora-pro": "--method lora-pro-lite",
           "sst": "--method lost", "switchlora": "--method relora", "galore-8bit": "drop state_bits",
           "adamw-8bit": "drop state_bits", "apollo-mini": "--opt side=shard"}


def _all() -> list[str]:
    return [m.name for m in methods_mod.available()]


@pytest.fixture(scope="module")
def under_fsdp(tmp_path_factory, rankwise_cache):
    from rankwise.data import prepare

    prepare(vocab_size=2048)
    path = tmp_path_factory.mktemp("methods") / "results.pt"
    runs = {m: dict(method=m, steps=STEPS, method_options=OPTIONS.get(m, {})) for m in _all()}
    mp.spawn(method_worker, args=(2, free_port(), str(path), runs), nprocs=2)
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("method", _all())
def test_every_method_runs_under_fsdp_as_in_one_process_or_is_refused_clearly(under_fsdp, method):
    got = under_fsdp[method]
    if method in REFUSED:
        assert isinstance(got, str), got
        assert got.startswith(f"--parallel fsdp cannot run --method {method}: ") and REFUSED[method] in got, got
        assert got.endswith("or keep the method and use --parallel ddp"), got
        return
    assert not isinstance(got, str), got
    one = losses(train(config(method=method, steps=STEPS, method_options=OPTIONS.get(method, {}))))
    # measured <= 3.3e-5 (MixLoRA's router; most methods ~1e-7): the reduce-scatter's summation order, amplified
    # where a method takes a sign or a top-k of near-ties
    assert max(abs(a - b) / b for a, b in zip(got, one)) <= 5e-4



def test_a_world_size_that_divides_no_row_count_pads_and_equals_one_process(tmp_path, rankwise_cache):
    """3 ranks: the mini model's 128 rows split 43 / 43 / 42, its 2048-token vocab 683 / 683 / 682 (FSDP2 pads the
    last shard); the shard-local update, Fira's statistics and the sharded basis work on the uneven shards."""
    from exact_helpers import METHODS

    from rankwise.data import prepare

    prepare(vocab_size=2048)
    names = ("full", "galore", "galore_shard", "fira_shard", "galore_shard_basis", "apollo_shard", "frugal")
    runs = {m: dict(steps=4, batch_size=6, **METHODS[m]) for m in names}
    mp.spawn(method_worker, args=(3, free_port(), str(tmp_path / "r.pt"), runs), nprocs=3)
    got = torch.load(tmp_path / "r.pt", weights_only=False)
    for m in names:
        one = losses(train(config(steps=4, batch_size=6, **METHODS[m])))
        assert not isinstance(got[m], str), got[m]
        # measured <= 3.7e-7
        assert max(abs(a - b) / b for a, b in zip(got[m], one)) <= 1e-5, m
