"""DDP script of ``test_budget.py``: an AttentionLogger at its default budget on 2 CPU ranks, two validations on
one Trainer (the second uses the first one's measured cost, agreed over the ranks).

Not collected by pytest (no ``test_`` prefix); run through :func:`helpers.run_ddp_script`.
"""

from __future__ import annotations

import json
from typing import Any

import attention_logger_models as models
import lightning.pytorch as pl
import torch
from helpers import reproducible, script_main, trainer_options

from lightning_attn import AttentionLogger
from lightning_attn.callbacks.budget import BudgetCoordinator

SAMPLES, BATCH_SIZE = 96, 2  # 24 batches per rank


def run(devices: int, strategy: str = "auto", out: str | None = None, root: str | None = None) -> dict[str, Any]:
    reproducible()
    module = models.CrossModalModule()
    callback = AttentionLogger(chunk_size=4, probe_samples=1, log_figures=False)
    trainer = pl.Trainer(callbacks=[callback], **trainer_options(root, devices=devices, strategy=strategy))
    loader = models.loader(SAMPLES, BATCH_SIZE)
    epochs = []
    for _ in range(2):
        trainer.validate(module, loader, verbose=False)
        ratio = BudgetCoordinator.of(trainer).ratio  # the cost ratio this run's schedule used
        epochs.append({"ratio": ratio, **models.results_json(callback), "coverage": callback.coverage["val"]})
    # every rank's view of the agreed ratio of the second run (all must be equal)
    ratios = trainer.strategy.all_gather(torch.tensor([epochs[1]["ratio"]], dtype=torch.float64))
    data = {"epochs": epochs, "ratios": ratios.flatten().tolist(), "world_size": trainer.world_size}
    if out is not None and trainer.is_global_zero:
        with open(out, "w") as handle:
            json.dump(data, handle)
    return data


if __name__ == "__main__":
    script_main(run)
