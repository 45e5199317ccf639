"""Astroformer == timm's CoAtNet with layout C-C-C-T: same weights, same outputs.

The fixture (tests/fixtures/timm_coatnet_small*) was produced by tools/make_timm_fixture.py in a
separate virtualenv with timm; this test needs no timm.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from galmorph.model.astroformer import Astroformer, AstroformerConfig
from galmorph.model.timm_compat import convert_timm_state_dict, timm_key_to_galmorph

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAME = "timm_coatnet_small"


@pytest.fixture(scope="module")
def timm_fixture() -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    meta = json.loads((FIXTURES / f"{NAME}.json").read_text())
    return (
        meta,
        load_file(str(FIXTURES / f"{NAME}.safetensors")),
        load_file(str(FIXTURES / f"{NAME}_io.safetensors")),
    )


def _model_like(meta: dict) -> Astroformer:
    cfg = AstroformerConfig(
        stem_width=meta["stem_width"],
        widths=tuple(meta["embed_dim"]),
        depths=tuple(meta["depths"]),
        head_hidden=meta["head_hidden_size"],
        layout=tuple(meta["block_type"]),
    )
    return Astroformer(cfg, num_classes=meta["num_classes"], img_size=meta["img_size"])


def _normalise(images: np.ndarray, meta: dict) -> torch.Tensor:
    # The fixture script's recipe, operation for operation.
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def test_fixture_is_small_and_from_timm_1_0(timm_fixture) -> None:
    meta, _, _ = timm_fixture
    assert meta["timm_version"].startswith("1.0.")
    assert meta["block_type"] == ["C", "C", "C", "T"]
    assert sum(p.stat().st_size for p in FIXTURES.glob(f"{NAME}*")) < 1_000_000


def test_timm_state_dict_loads_strictly(timm_fixture) -> None:
    meta, timm_state, _ = timm_fixture
    model = _model_like(meta)
    model.load_state_dict(convert_timm_state_dict(timm_state), strict=True)
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"]


def test_outputs_match_timm(timm_fixture) -> None:
    torch.set_num_threads(1)
    meta, timm_state, io = timm_fixture
    model = _model_like(meta)
    model.load_state_dict(convert_timm_state_dict(timm_state), strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(_normalise(io["images"].numpy(), meta))
    expected = io["logits"]
    assert logits.shape == expected.shape
    # The randomised weights give logits of order 1-10; differences are rounding only.
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_key_mapping_of_the_renamed_modules() -> None:
    assert timm_key_to_galmorph("stages.3.blocks.0.norm1.norm.weight") == "stages.3.0.norm1.weight"
    assert timm_key_to_galmorph("stages.0.blocks.0.shortcut.expand.bias") == (
        "stages.0.0.shortcut.proj.bias"
    )
    assert timm_key_to_galmorph("head.pre_logits.fc.weight") == "head.pre_logits.weight"


def test_unsupported_timm_features_are_refused() -> None:
    with pytest.raises(ValueError, match="does not implement"):
        convert_timm_state_dict({"stages.3.blocks.0.ls1.gamma": torch.zeros(4)})
