"""`precision`: auto picks bf16 only where the hardware computes it natively, the run records
what ran and why, checkpoints stay fp32, and a bf16 run resumes exactly."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from galmorph.core import cpu as cpu_module
from galmorph.core.cpu import cpu_bf16_flags
from galmorph.training import precision as precision_module
from galmorph.training.config import ConfigError, TrainConfig, load_config
from galmorph.training.precision import Fp32Conv2d, Precision, resolve_precision
from galmorph.training.state import load_checkpoint
from galmorph.training.train import TrainingInterrupted, train
from tests.support.training_helpers import make_synthetic, tiny_config

torch.set_num_threads(1)

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: fpu sse2 avx2 {flags}\n")
    return path


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("avx512f avx512_bf16", ("avx512_bf16",)),
        ("amx_tile amx_bf16 avx512_bf16", ("avx512_bf16", "amx_bf16")),
        ("avx512f avx512_vnni", ()),  # VNNI is int8, not bf16
    ],
)
def test_cpu_bf16_flags_are_read_from_cpuinfo(
    flags: str, expected: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_module, "CPUINFO", _cpuinfo(tmp_path, flags))
    assert cpu_bf16_flags() == expected


def test_unreadable_cpuinfo_means_no_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_module, "CPUINFO", tmp_path / "missing")
    assert cpu_bf16_flags() == ()
    assert resolve_precision("auto", CPU).name == "fp32"


def test_auto_on_a_cpu_picks_bf16_only_with_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ("amx_bf16",))
    chosen = resolve_precision("auto", CPU)
    assert (chosen.name, chosen.channels_last) == ("bf16", False)
    assert chosen.describe() == "bf16 autocast on cpu: precision=auto, CPU has amx_bf16"
    # A training run's log and card also say which convolutions it kept in fp32.
    assert chosen.describe(training=True) == (
        "bf16 autocast (strided depthwise convolutions in fp32) on cpu: precision=auto, "
        "CPU has amx_bf16"
    )
    with chosen.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16

    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ())
    chosen = resolve_precision("auto", CPU)
    assert (chosen.name, chosen.channels_last) == ("fp32", False)
    assert "CPU has none of avx512_bf16, amx_bf16" in chosen.describe()
    with chosen.autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    # Forced settings win over the hardware either way.
    assert resolve_precision("bf16", CPU).name == "bf16"
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    assert resolve_precision("fp32", CPU).name == "fp32"


@pytest.mark.parametrize(("supported", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_the_gpus_bf16_support(
    supported: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA T")
    # The CPU's flags do not decide for a GPU.
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    chosen = resolve_precision("auto", CUDA)
    assert chosen.name == expected and chosen.channels_last  # channels_last on CUDA either way
    assert "NVIDIA T" in chosen.reason


def test_config_key_and_the_legacy_amp_and_channels_last_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert TrainConfig().precision == "auto"
    with pytest.raises(ConfigError, match="'precision' must be one of"):
        TrainConfig(data="x.h5", out="o", model="gm_astroformer_tiny", precision="fp16").validate()
    old = tmp_path / "old.yaml"
    old.write_text("amp: false\nchannels_last: true\n")
    with caplog.at_level(logging.WARNING):
        assert load_config(old).precision == "fp32"
    assert "'amp' is replaced by 'precision'" in caplog.text
    assert "'channels_last' is no longer read" in caplog.text
    assert load_config(old, ["precision=bf16"]).precision == "bf16"  # a later source wins
    assert TrainConfig.from_dict({"amp": True}).precision == "auto"
    with pytest.raises(ConfigError, match="'amp' and 'precision' are both given"):
        TrainConfig.from_dict({"amp": False, "precision": "bf16"})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("precision") / "synth.h5", n=100)


def _step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "step"}


def test_the_run_records_what_ran_and_why(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ())
    with caplog.at_level(logging.INFO):
        run_dir = train(
            tiny_config(
                data, tmp_path / "run", epochs=1, split_fractions=[0.8, 0.2, 0], precision="auto"
            )
        )
    assert "precision: fp32 on cpu: precision=auto, CPU has none of" in caplog.text
    assert "CPU memory: " in caplog.text  # galmorph.core.allocator asked, on a CPU
    # A resume reads config.json: it holds what ran, not "auto".
    assert json.loads((run_dir / "config.json").read_text())["precision"] == "fp32"
    card = json.loads((run_dir / "model.json").read_text())
    assert card["training_data"]["precision"].startswith("fp32 on cpu: precision=auto")


def test_a_bf16_run_resumes_exactly_and_keeps_fp32_weights(data: Path, tmp_path: Path) -> None:
    # 80 training images / batch 16 = 5 steps per epoch; stop inside epoch 2. Every source of
    # randomness is on, as in test_resume.py, plus the EMA.
    settings = {
        "precision": "bf16",
        "augment": {"policy": "paper"},
        "mixup": {"mixup_alpha": 0.8},
        "drop_path_rate": 0.1,
        "ema": True,
        "ema_decay": 0.9,
        "clip_grad": 1.0,
    }
    straight = train(tiny_config(data, tmp_path / "straight", **settings))
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(data, tmp_path / "resumed", stop_after_step=7, **settings))
    state = load_checkpoint(tmp_path / "resumed")
    assert state["config"]["precision"] == "bf16"
    float_tensors = [*state["model"].values(), *state["ema"].values()]
    float_tensors += [
        value
        for per_param in state["optimizer"]["state"].values()
        for key, value in per_param.items()
        if key != "step"
    ]
    assert all(t.dtype == torch.float32 for t in float_tensors if t.is_floating_point())
    resumed = train(tiny_config(data, tmp_path / "resumed", **settings), resume=True)

    expected, actual = _step_losses(straight), _step_losses(resumed)
    assert sorted(actual) == sorted(expected) == list(range(1, 11))
    assert [actual[s] for s in range(8, 11)] == [expected[s] for s in range(8, 11)]
    weights_a = load_file(str(straight / "model.safetensors"))
    weights_b = load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert {t.dtype for t in weights_a.values() if t.is_floating_point()} == {torch.float32}


def test_bf16_training_on_a_cpu_keeps_strided_depthwise_convolutions_in_fp32() -> None:
    from galmorph.model.registry import create_model

    model = create_model("gm_astroformer_tiny", img_size=32)
    keys = list(model.state_dict())
    Precision("bf16", "cpu", "asked").prepare(model, training=False)  # evaluation: untouched
    assert not any(isinstance(m, Fp32Conv2d) for m in model.modules())
    bf16 = Precision("bf16", "cpu", "asked")
    bf16.prepare(model, training=True)
    swapped = [m for m in model.modules() if isinstance(m, Fp32Conv2d)]
    assert swapped and all(m.stride == (2, 2) and m.groups == m.in_channels for m in swapped)
    assert list(model.state_dict()) == keys  # checkpoints and exports see the same model
    conv = swapped[0]
    x = torch.randn(1, conv.in_channels, 8, 8)
    fp32 = torch.nn.functional.conv2d(x, conv.weight, None, 2, 1, 1, conv.groups)
    with bf16.autocast():
        # Computed in fp32 (a bf16 convolution rounds its inputs first), handed on in bf16.
        assert torch.equal(conv(x), fp32.to(torch.bfloat16))
        assert model(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16  # the rest autocasts
    assert torch.equal(conv(x), fp32)  # outside autocast, a plain fp32 convolution
