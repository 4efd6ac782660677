"""AdaLoRA in the training loop: no extra call, the budget reaches its target, OUT/adapter loads in PEFT, resume is
exact, and under DDP (2 gloo processes) every rank holds the same masks as one process on the same global batch."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from finetune_helpers import logits, model_folder, quick_run, text_corpus, tokens

from rankwise import adapters
from rankwise.adapters.adalora import AdaLoRA
from rankwise.distributed import free_port
from rankwise.train import TrainConfig, train

OPTIONS = {"r": 6, "target_r": 2, "tinit": 2, "tfinal": 4, "target": "all-linear", "alpha": 8.0}


def masks(model) -> dict[str, list[bool]]:
    return {k: m.rank_mask.tolist() for k, m in adapters.active_parameterizations(model).items()
            if isinstance(m, AdaLoRA)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adalora-ft")
    return model_folder(tmp / "model"), text_corpus(tmp / "data.jsonl"), tmp


def test_adalora_fine_tune_reaches_the_target_budget_and_peft_loads_the_adapter(setup):
    peft = pytest.importorskip("peft")
    folder, data, tmp = setup
    res = quick_run(tmp / "run", folder, data, model=folder, method="adalora", method_options=OPTIONS, steps=16,
                    lr=5e-2, eval_batches=2)
    assert res.metrics["final_eval_loss"] < res.metrics["initial_eval_loss"] - 0.15, res.metrics  # measured -0.27
    kept = masks(res.model)
    assert sum(map(sum, kept.values())) == OPTIONS["target_r"] * len(kept)  # the final budget
    config = json.loads((tmp / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 16
    from transformers import AutoModelForCausalLM

    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(tmp / "run" / "adapter"))
    x = tokens()
    assert (logits(loaded, x) - logits(res.model, x)).abs().max() <= 1e-5


def test_adalora_resume_is_exact(setup):
    folder, data, tmp = setup
    common = dict(model=folder, method="adalora", method_options=OPTIONS, steps=12, lr=1e-2, checkpoint_every=0)
    straight = quick_run(tmp / "straight", folder, data, **common)
    quick_run(tmp / "resumed", folder, data, stop_at=5, **common)
    resumed = quick_run(tmp / "resumed", folder, data, resume=str(tmp / "resumed"), **common)
    assert masks(resumed.model) == masks(straight.model)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


DDP = dict(preset="tiny", steps=6, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=0, dtype="fp32", eval_every=0,
           eval_batches=1, quiet=True, method="adalora",
           method_options={"r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "target": "q_proj,v_proj,down_proj"})


def ddp_worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = train(TrainConfig(**DDP, parallel="ddp"))
        torch.save({"masks": masks(res.model), "state": {k: v.clone() for k, v in res.model.state_dict().items()}},
                   f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_adalora_under_ddp_has_identical_masks_on_every_rank(corpus, tmp_path):
    path = str(tmp_path / "ddp")
    mp.spawn(ddp_worker, args=(2, free_port(), path), nprocs=2)
    ranks = [torch.load(f"{path}.{r}", weights_only=False) for r in range(2)]
    single = train(TrainConfig(**DDP))
    assert ranks[0]["masks"] == ranks[1]["masks"] == masks(single.model)
    assert sum(map(sum, ranks[0]["masks"].values())) == 2 * len(ranks[0]["masks"])
    ref = single.model.state_dict()
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k])
        assert (v.float() - ref[k].float()).abs().max() <= 1e-4, k
