"""Load weights trained with timm's MaxxVit/CoAtNet (hence the official Astroformer code).

timm's CoAtNet and galmorph's Astroformer compute the same function; only a few module names
differ. `convert_timm_state_dict` renames a timm state dict to galmorph's names, so weights
trained with the official code (timm coatnet_* with block_type C-C-C-T) load into the matching
`astroformer_*` model with `load_state_dict(..., strict=True)`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# (timm pattern, galmorph replacement), applied in order to every key.
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\."), r"stages.\1.\2."),
    (re.compile(r"\.shortcut\.expand\."), ".shortcut.proj."),
    # A downsampling transformer block wraps its LayerNorm with the (parameter-free) pool.
    (re.compile(r"\.norm1\.norm\."), ".norm1."),
    (re.compile(r"^head\.pre_logits\.fc\."), "head.pre_logits."),
)


def timm_key_to_galmorph(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    return key


def convert_timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm MaxxVit (CoAtNet layouts, 'bias' relative positions) names -> galmorph names.

    Raises ValueError for keys of timm features galmorph does not implement (layer scale,
    MLP relative positions, MaxViT partition attention), rather than dropping them silently.
    """
    unsupported = [k for k in state_dict if re.search(r"\.(ls\d|rel_pos\.mlp|attn_block)\.", k)]
    if unsupported:
        raise ValueError(
            "timm weights use features galmorph's Astroformer does not implement: "
            + ", ".join(unsupported[:5])
        )
    converted = {timm_key_to_galmorph(k): v for k, v in state_dict.items()}
    if len(converted) != len(state_dict):
        raise ValueError("timm state dict maps two keys onto one galmorph name")
    return converted
