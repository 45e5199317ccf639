"""Build the timm parity fixture used by tests/model/test_timm_parity.py.

The official Astroformer code is timm's MaxxVit/CoAtNet with the block layout C-C-C-T. This
script builds a SMALL configuration through exactly the code path of

    timm.create_model("coatnet_0_224", block_type=("C", "C", "C", "T"), img_size=256,
                      num_classes=10)

(the same MaxxVitCfg, conv and transformer configs as coatnet_0, with only the widths, depths,
stem width, head width and input size shrunk), randomises every parameter and BatchNorm
statistic, and saves its weights, a seeded input and timm's eval-mode logits, so galmorph can
prove output equivalence without depending on timm.

timm needs torchvision and hence a different torch than the project's, so run it in its own
virtualenv (the project never imports timm):

    python3 -m venv /tmp/timm-venv
    /tmp/timm-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31 safetensors
    /tmp/timm-venv/bin/python tools/make_timm_fixture.py [--out tests/fixtures]

Fixture generated with timm 1.0.31, torch 2.14.1. Writes, in --out:
  timm_coatnet_small.json           config, timm/torch versions, input recipe
  timm_coatnet_small.safetensors    timm state dict (timm's parameter names)
  timm_coatnet_small_io.safetensors "images" uint8 NHWC and timm's float32 "logits"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file

NAME = "timm_coatnet_small"
# Small enough for a < 1 MB fixture, big enough to exercise every code path: a stride-2 and a
# stride-1 block in a conv stage, a stride-2 (pooling, widening) and a stride-1 transformer
# block, 2 heads, and a 3x3 token grid in the transformer stage (a 5x5 bias table).
SMALL = {
    "embed_dim": (16, 24, 32, 64),
    "depths": (1, 2, 1, 2),
    "stem_width": 16,
    "head_hidden_size": 48,
}
BLOCK_TYPE = ("C", "C", "C", "T")
IMG_SIZE = 96
NUM_CLASSES = 10
BATCH = 2
SEED = 0
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter and BatchNorm statistic a non-trivial value (init leaves many at
    0 or 1, which would hide a swapped or missing mapping)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            else:
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> normalised float32 NCHW; the test applies the same recipe."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    args = parser.parse_args()

    torch.manual_seed(SEED)
    model = timm.create_model(
        "coatnet_0_224",
        block_type=BLOCK_TYPE,
        img_size=IMG_SIZE,
        num_classes=NUM_CLASSES,
        **SMALL,
    )
    randomise(model, SEED)
    model.eval()

    images = np.random.default_rng(SEED).integers(
        0, 256, size=(BATCH, IMG_SIZE, IMG_SIZE, 3), dtype=np.uint8
    )
    with torch.no_grad():
        logits = model(normalise(images))

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / f"{NAME}.safetensors"))
    save_file(
        {"images": torch.from_numpy(images), "logits": logits.contiguous()},
        str(args.out / f"{NAME}_io.safetensors"),
    )
    meta = {
        "timm_model": "coatnet_0_224",
        "block_type": list(BLOCK_TYPE),
        **{k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items()},
        "img_size": IMG_SIZE,
        "num_classes": NUM_CLASSES,
        "mean": list(MEAN),
        "std": list(STD),
        "input_recipe": "uint8 NHWC -> float NCHW / 255 -> (x - mean) / std",
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    (args.out / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
