"""Training: config handling, augmentation, sampling, schedule, the loop's checkpointing and
reporting stages alone, and a tiny model that learns."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from galmorph.training.augment import AugmentSettings, BatchAugmenter, dihedral_views
from galmorph.training.checkpointing import STATE_FORMAT, Checkpointer, EpochTotals
from galmorph.training.config import ConfigError, TrainConfig, load_config
from galmorph.training.dataset import ShardedBatchSampler, balanced_class_weights
from galmorph.training.distributed import DistContext
from galmorph.training.evaluate import EvaluationRequest, evaluate
from galmorph.training.mixup import Mixup, MixupSettings
from galmorph.training.optim import CosineSchedule, adamw
from galmorph.training.randaugment import rand_augment
from galmorph.training.reporting import METRICS_FILE, EpochBar, RunReport
from galmorph.training.state import flatten_tensors, restore_tensors, save_checkpoint
from galmorph.training.train import TrainingInterrupted, train
from tests.support.training_helpers import config_flags, make_synthetic, tiny_config

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- config
def test_defaults_are_the_paper_recipe() -> None:
    config = TrainConfig()
    # timm: lr_base 2e-5 x sqrt(256 x 8 GPUs / 256) for AdamW (DESIGN.md: about 5.7e-5).
    assert config.learning_rate(world_size=8) == pytest.approx(2e-5 * math.sqrt(8))
    assert (config.model_img_size(), config.epochs, config.weight_decay) == (256, 300, 2e-5)
    assert (config.warmup_epochs, config.warmup_lr) == (5.0, 1e-5)
    mixup = config.mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing) == (0.8, 0.0, 0.1)
    assert (config.drop_rate, config.drop_path_rate, config.ema) == (0.1, 0.0, False)
    augment = config.augment
    assert (augment.policy, augment.rrc_scale, augment.color_jitter) == ("paper", (0.08, 1.0), 0.4)
    assert augment.randaugment_ops == 0


def test_config_file_then_flags_then_overrides(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("epochs: 7\nlr_base: 1e-4\nbetas: [0.9, 0.99]\nmodel: coatnet_0\n")
    config = load_config(yaml_file, ["epochs=9", "ema=true"], data="d.h5", out="o", model="x")
    assert (config.epochs, config.lr_base, config.betas) == (9, 1e-4, (0.9, 0.99))
    assert (config.model, config.ema, config.data) == ("x", True, "d.h5")
    toml_file = tmp_path / "c.toml"
    toml_file.write_text('clip_grad = 1.0\n[augment]\npolicy = "galaxy"\n')
    assert load_config(toml_file).augment.policy == "galaxy"


def test_yaml_sections_load_and_dotted_set_overrides_one_key(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "augment:\n  policy: galaxy\n  scale_range: [0.8, 1.2]\n  hflip: 0.2\n"
        "mixup:\n  mixup_alpha: 0.0\n  label_smoothing: 0.05\n"
    )
    config = load_config(yaml_file, ["augment.hflip=0.7", "mixup.cutmix_alpha=1"])
    # The override replaces one key; the file's other keys of that section stay.
    assert config.augment == AugmentSettings(policy="galaxy", scale_range=(0.8, 1.2), hflip=0.7)
    assert config.mixup == MixupSettings(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.05)


def test_saved_config_and_set_flags_round_trip() -> None:
    config = TrainConfig.from_dict(
        {"data": "d", "out": "o", "augment": {"policy": "none"}, "mixup": {"prob": 0.5}}
    )
    # config.json holds the nested form; a resume reads it back.
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.to_dict()["augment"]["policy"] == "none"
    # --set flags carry dotted keys.
    flags = config_flags(config)
    assert 'augment.policy="none"' in flags and "mixup.prob=0.5" in flags
    assert set(flags[::2]) == {"--set"}
    overrides = flags[1::2]
    assert load_config(None, overrides, data="d", out="o", model=config.model) == config


@pytest.mark.parametrize(
    ("overrides", "new_key"),
    [
        (["hflip=0.5"], "augment.hflip"),
        (["augment=galaxy"], "augment.policy"),
        (["randaugment_ops=2"], "augment.randaugment_ops"),
        (["mixup_alpha=0"], "mixup.mixup_alpha"),
        (["mixup_prob=0.5"], "mixup.prob"),
        (["label_smoothing=0"], "mixup.label_smoothing"),
    ],
)
def test_flat_section_keys_are_refused_naming_the_new_key(
    overrides: list[str], new_key: str
) -> None:
    with pytest.raises(ConfigError, match=f"has moved: use {re.escape(new_key)}$"):
        load_config(None, overrides)


def test_flat_key_in_a_config_file_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    yaml_file = tmp_path / "old.yaml"
    yaml_file.write_text("epochs: 3\ncolor_jitter: 0.2\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: .*'color_jitter' has moved: use augment\."):
        load_config(yaml_file)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["augment.foo=0"], r"'augment\.foo' is unknown; augment keys: augment\.policy, "),
        (["augment.hfilp=0"], r"did you mean 'augment\.hflip'"),
        (["mixup=0"], r"'mixup' is a section, not a value; mixup keys: mixup\.mixup_alpha, "),
        (["optim.lr=1"], r"unknown config key\(s\) 'optim\.lr'; valid keys: data, model, "),
    ],
)
def test_unknown_section_keys_name_the_valid_ones(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_img_size_defaults_to_the_registered_size() -> None:
    from galmorph.model.registry import create_model, model_entry

    registered = model_entry("gm_astroformer_tiny").default_img_size
    assert registered != 256  # so the test tells the registry's size from the old default
    assert TrainConfig(model="gm_astroformer_tiny").model_img_size() == registered
    assert TrainConfig(model="gm_astroformer_tiny", img_size=48).model_img_size() == 48
    assert create_model("gm_astroformer_tiny").img_size == registered
    with pytest.raises(ConfigError, match="'model': unknown model 'astroformer_99'"):
        TrainConfig(data="d", out="o", model="astroformer_99").validate()


def test_a_run_records_the_registered_img_size(tmp_path: Path) -> None:
    from galmorph.model.checkpoint import load_spec
    from galmorph.model.registry import model_entry

    data = make_synthetic(tmp_path / "synth.h5", n=40)
    config = tiny_config(data, tmp_path / "run", img_size=None, batch_size=4, stop_after_step=1)
    with pytest.raises(TrainingInterrupted):
        train(config)
    registered = model_entry(config.model).default_img_size
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["img_size"] == registered  # a resume does not depend on the registry
    assert load_spec(tmp_path / "run").img_size == registered


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["epoch=3"], "unknown config key"),
        (["epochs=many"], "'epochs' must be an integer"),
        (["ema=yes please"], "'ema' must be true or false"),
        (["betas=[0.9]"], "'betas' needs a list of 2"),
        (["justtext"], "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_validate_rejects_inconsistent_values() -> None:
    with pytest.raises(ConfigError, match="'batch_size' must be even"):
        TrainConfig(data="d", out="o", batch_size=15).validate()
    with pytest.raises(ConfigError, match=r"'augment\.policy' must be one of"):
        TrainConfig(data="d", out="o", augment=AugmentSettings(policy="fancy")).validate()
    with pytest.raises(ConfigError, match=r"'mixup\.prob' must be in"):
        TrainConfig(data="d", out="o", mixup=MixupSettings(prob=2.0)).validate()
    with pytest.raises(ConfigError, match="'data' is required"):
        TrainConfig(out="o").validate()


# ------------------------------------------------------------------------ augmentation
def _images(n: int = 6, size: int = 24, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_galaxy_policy_without_shift_or_zoom_is_an_exact_dihedral_view() -> None:
    images = _images()
    settings = AugmentSettings(
        policy="galaxy", color_jitter=0, scale_range=(1, 1), shift_fraction=0
    )
    out = BatchAugmenter(settings, 24)(images, torch.Generator().manual_seed(3))
    views = dihedral_views(images.numpy())
    for i in range(len(images)):
        assert any(np.array_equal(out[i].numpy(), view[i]) for view in views)
    # Over a few batches every one of the 8 views occurs.
    seen = set()
    for seed in range(12):
        out = BatchAugmenter(settings, 24)(images, torch.Generator().manual_seed(seed))
        for i in range(len(images)):
            seen |= {k for k, v in enumerate(views) if np.array_equal(out[i].numpy(), v[i])}
    assert seen == set(range(8))


def test_paper_policy_full_crop_without_flip_is_the_identity() -> None:
    images = _images()
    settings = AugmentSettings(rrc_scale=(1, 1), rrc_ratio=(1, 1), hflip=0, color_jitter=0)
    out = BatchAugmenter(settings, 24)(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, images)


@pytest.mark.parametrize("policy", ["paper", "galaxy", "none"])
def test_augmenter_output_contract_and_determinism(policy: str) -> None:
    images = _images(size=64)
    settings = AugmentSettings(policy=policy, randaugment_ops=2)
    first = BatchAugmenter(settings, 32)(images, torch.Generator().manual_seed(5))
    again = BatchAugmenter(settings, 32)(images, torch.Generator().manual_seed(5))
    other = BatchAugmenter(settings, 32)(images, torch.Generator().manual_seed(6))
    assert first.dtype == torch.uint8 and first.shape == (6, 32, 32, 3)
    assert torch.equal(first, again)
    assert policy == "none" or not torch.equal(first, other)


def test_rand_augment_keeps_range_and_changes_images() -> None:
    x = _images(n=32).permute(0, 3, 1, 2).float() / 255
    out = rand_augment(x, 3, 9.0, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    changed = (out - x).abs().flatten(1).amax(1) > 1e-6
    assert 0 < int(changed.sum()) < 32  # each op applies with probability 0.5


def test_mixup_targets_are_smoothed_distributions() -> None:
    x = torch.randn(8, 3, 4, 4)
    labels = torch.arange(8) % 4
    mixup = Mixup(MixupSettings(mixup_alpha=0.8, label_smoothing=0.1), num_classes=4)
    mixed, targets = mixup(x, labels, np.random.default_rng(0))
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert targets.min() >= 0.1 / 4 - 1e-7
    lam = float(targets[0, labels[0]] - 0.1 / 4) / 0.9 + (0.0 if labels[0] != labels[7] else 0)
    assert torch.allclose(mixed[0], x[0] * lam + x[7] * (1 - lam), atol=1e-5)


# ----------------------------------------------------------------- sampling, schedule
def test_sharded_batches_match_accumulated_micro_batches() -> None:
    """2 ranks x 1 micro-batch == 1 rank x 2 accumulated micro-batches, shard by shard."""
    ranks = [list(ShardedBatchSampler(50, 4, rank=r, world_size=2, seed=1)) for r in range(2)]
    single = list(ShardedBatchSampler(50, 4, accum_steps=2, seed=1))
    assert len(single) == 2 * len(ranks[0]) == 12  # 6 steps of 8; 2 examples dropped
    for step in range(6):
        assert ranks[0][step] == single[2 * step] and ranks[1][step] == single[2 * step + 1]
    seen = [i for batch in single for i in batch]
    assert len(set(seen)) == len(seen) == 48


def test_resumed_sampler_skips_completed_steps() -> None:
    sampler = ShardedBatchSampler(40, 5, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_step=3)
    assert list(sampler) == full[3:]


def test_balanced_sampling_and_weights_even_out_classes() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    weights = balanced_class_weights(np.bincount(labels))
    assert np.isclose((weights * np.bincount(labels)).sum(), len(labels))  # mean weight 1
    assert weights[1] == pytest.approx(9 * weights[0])
    sampler = ShardedBatchSampler(100, 100, seed=0, weights=1.0 / np.bincount(labels)[labels])
    drawn = labels[next(iter(sampler))]
    assert 35 <= int((drawn == 1).sum()) <= 65


def test_cosine_schedule_matches_timm_endpoints() -> None:
    schedule = CosineSchedule(1e-3, 1e-5, 0.0, warmup_epochs=5, epochs=300, steps_per_epoch=10)
    assert schedule.lr_at(0) == pytest.approx(1e-5)
    assert schedule.lr_at(25) == pytest.approx((1e-5 + 1e-3) / 2)
    # After warmup the cosine follows the whole run's progress (timm's warmup_prefix=False).
    assert schedule.lr_at(50) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 5 / 300)))
    assert schedule.lr_at(3000) == pytest.approx(0.0, abs=1e-12)


def test_adamw_exempts_biases_norms_and_position_tables() -> None:
    from galmorph.model.registry import create_model

    model = create_model("gm_astroformer_tiny", img_size=32)
    optimizer = adamw(model, 1e-3, 0.05, (0.9, 0.999))
    no_decay = {id(p) for p in optimizer.param_groups[0]["params"]}
    for name, param in model.named_parameters():
        exempt = param.ndim <= 1 or "relative_position_bias_table" in name
        assert (id(param) in no_decay) == exempt, name


def test_ema_decay_warms_up_so_a_short_run_forgets_its_random_start() -> None:
    from galmorph.training.optim import ModelEma

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ModelEma(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)  # decay (1 + 0) / (10 + 0) = 0.1
    assert ema.module.weight.item() == pytest.approx(0.9)
    assert ema.decay_at(10_000) == 0.99
    for step in range(1, 135):
        ema.update(model, step)
    assert ema.module.weight.item() > 0.999  # no trace of the initial weight is left


def test_checkpoint_structure_round_trips_tensors_ints_and_tuples() -> None:
    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "betas": (0.9, 0.99)}}
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten_tensors(state, tensors)
    restored = restore_tensors(json.loads(json.dumps(structure)), tensors)
    assert restored["optimizer"]["betas"] == (0.9, 0.99)
    assert torch.equal(restored["optimizer"]["state"][0]["step"], torch.tensor(3.0))


# ------------------------------------------------------------- the loop's stages alone
SINGLE = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def _checkpointer(run_dir: Path, **overrides: object) -> Checkpointer:
    config = TrainConfig.from_dict(
        {"data": "x.h5", "out": str(run_dir), "model": "gm_astroformer_tiny", **overrides}
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    return Checkpointer(
        config,
        SINGLE,
        run_dir,
        model=model,
        ema=None,
        swa=None,
        optimizer=optimizer,
        steps_per_epoch=4,
    )


def test_restore_loads_weights_and_position_and_refuses_another_global_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved = _checkpointer(tmp_path, batch_size=16)
    with torch.no_grad():
        saved.model.weight.fill_(0.5)
    state = {
        "format": STATE_FORMAT,
        "epoch": 1,
        "step": 6,
        "global_batch": 16,
        "epoch_totals": [1.5, 20.0, 32.0, 2.0],
        "history": [{"kind": "epoch", "epoch": 1}],
        "config": saved.config.to_dict(),
        "model": saved.model.state_dict(),
        "optimizer": saved.optimizer.state_dict(),
        "ema": None,
    }
    save_checkpoint(tmp_path, state, 6)

    resumed = _checkpointer(tmp_path, batch_size=16, lr=1e-3)
    with caplog.at_level(logging.WARNING):
        progress, totals = resumed.restore()
    assert (progress.epoch, progress.step, progress.history) == (1, 6, state["history"])
    assert totals == EpochTotals(1.5, 20.0, 32.0, 2.0)
    assert torch.equal(resumed.model.weight, torch.full((2, 3), 0.5))
    # Only the key that changed: tuples restored from the checkpoint equal the same lists.
    assert caplog.messages == ["resuming with changed settings: lr"]
    with pytest.raises(ConfigError, match="global batch of 16, this run has 8"):
        _checkpointer(tmp_path, batch_size=8).restore()


def test_truncated_metrics_keep_the_records_up_to_the_checkpoint(tmp_path: Path) -> None:
    config = TrainConfig.from_dict({"data": "x.h5", "out": str(tmp_path), "epochs": 3})
    report = RunReport(config, SINGLE, tmp_path)
    for step in (1, 2, 3):
        report.step(step=step, epoch=step / 4, loss=0.5, correct=1.0, lr=1e-3, grad_norm=None)
    with open(tmp_path / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write('{"kind": "step", "ste')  # a line cut short by kill -9
    report.truncate_metrics(2)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_an_epochs_images_per_second_is_over_its_whole_time() -> None:
    bar = EpochBar(desc="epoch 1/1", total=2, initial=0, global_batch=16, show=False)
    bar.step(loss=1.0, acc=0.5, lr=1e-3, remaining_steps=1)
    bar.step(loss=1.0, acc=0.5, lr=1e-3, remaining_steps=0)
    bar.close()
    assert bar.seconds is not None and bar.seconds > 0
    assert bar.images_per_s() == pytest.approx(32 / bar.seconds)


# ------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_tiny_model_beats_chance_on_held_out_split(tmp_path: Path) -> None:
    data = make_synthetic(tmp_path / "synth.h5", n=600)
    config = tiny_config(
        data,
        tmp_path / "run",
        epochs=6,
        batch_size=32,
        augment={"policy": "galaxy"},
        mixup={"mixup_alpha": 0.0},
        drop_rate=0.0,
        log_every_steps=5,
    )
    run_dir = train(config)
    report = evaluate(EvaluationRequest(model=run_dir, data=data, split="test", progress=False))
    chance = 1 / 10
    # 60 balanced test images never seen in training; a seeded run reaches ~0.6.
    assert report["num_images"] == 60
    assert report["top1"] >= 3.5 * chance, report["top1"]
    assert report["macro_f1"] >= 2.5 * chance
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(1, 7))
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert (run_dir / "curves.png").stat().st_size > 10_000
    spec = json.loads((run_dir / "model.json").read_text())
    assert spec["training_data"]["epochs_completed"] == 6
    assert spec["metrics"]["val_top1"] == epochs[-1]["val_top1"]
