"""DDP: two gloo processes under torchrun match one process with the same global batch.

BatchNorm normalises with per-process batch statistics, so 2 ranks x 8 images are not the
same computation as 1 process x 16 images (SyncBatchNorm would make them so, but torch has
no CPU kernel for it). The exact single-process counterpart of 2 ranks x 8 is 1 process
accumulating 2 micro-batches of 8: the sampler deals the same examples to shard s whether s
is a rank or a micro-batch, and augmentation, mixup and dropout are keyed by shard, so every
randomness source stays on. What may differ is only floating-point summation order in the
gradient all-reduce. BatchNorm running statistics (buffers, not trained parameters) do
differ by design: DDP keeps rank 0's, accumulation averages over both micro-batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from galmorph.model.registry import create_model
from galmorph.training.train import seed_everything, train
from tests.support.training_helpers import make_synthetic, tiny_config, torchrun_train

torch.set_num_threads(1)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:

    data = make_synthetic(tmp_path / "synth.h5", n=200)
    settings = {
        "epochs": 1,
        "batch_size": 8,
        "augment": {"policy": "paper"},
        "mixup": {"mixup_alpha": 0.8},
        "drop_rate": 0.1,
        "clip_grad": 1.0,
        "lr": 1e-3,
    }
    single = train(tiny_config(data, tmp_path / "single", grad_accum_steps=2, **settings))

    ddp_config = tiny_config(data, tmp_path / "ddp", **settings)
    result = torchrun_train(data, tmp_path / "ddp", ddp_config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 process(es): global batch 16" in result.stderr

    ddp = tmp_path / "ddp"
    single_params = load_file(str(single / "model.safetensors"))
    ddp_params = load_file(str(ddp / "model.safetensors"))
    assert single_params.keys() == ddp_params.keys()
    trained = [k for k in single_params if not k.endswith(("running_mean", "running_var"))]
    trained = [k for k in trained if not k.endswith("num_batches_tracked")]
    seed_everything(ddp_config.seed)  # the trainer's initial weights
    initial = create_model(ddp_config.model, img_size=ddp_config.img_size).state_dict()
    worst = max((single_params[k] - ddp_params[k]).abs().max().item() for k in trained)
    moved = max((single_params[k] - initial[k]).abs().max().item() for k in trained)
    # Ten AdamW steps at lr 1e-3 move weights by ~1e-2; the two runs agree to round-off.
    assert moved > 1e-3, moved
    assert worst < 1e-5, worst

    def losses(run: Path) -> list[float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "step"]

    assert len(losses(single)) == len(losses(ddp)) == 10
    assert losses(single) == pytest.approx(losses(ddp), abs=1e-5)
