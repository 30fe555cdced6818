"""Named renamings of state-dict keys, for weights saved by another implementation.

A model.toml names one with ``weights.key_map``. Each takes the loaded state dict and the freshly
built target module and returns a state dict in the target's key layout; loading stays strict, so a
renaming that misses a key fails start-up instead of serving half-random weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

StateDict = Mapping[str, torch.Tensor]
KeyMap = Callable[[StateDict, nn.Module], dict[str, torch.Tensor]]

# EfficientNet-PyTorch (lukemelas) names -> timm EfficientNet names.
_EFFNET_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# A block without an expansion conv is timm's DepthwiseSeparableConv ...
_EFFNET_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# ... and one with it is timm's InvertedResidual.
_EFFNET_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EFFNET_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TIMM_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def efficientnet_pytorch(state: StateDict, target: nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch's flat ``_blocks.N`` onto timm's ``blocks.stage.index``.

    The flat block numbers are laid onto timm's stages in order; the stage sizes are read from the
    target module itself, so this serves every EfficientNet and EfficientNet-Lite width.
    """
    positions: list[tuple[int, int]] = []
    for key in target.state_dict():
        match = _TIMM_BLOCK_KEY.match(key)
        if match:
            stage_block = (int(match[1]), int(match[2]))
            if not positions or positions[-1] != stage_block:
                positions.append(stage_block)
    expands = {
        int(m[1]) for k in state if (m := _EFFNET_BLOCK_KEY.match(k)) and m[2] == "_expand_conv"
    }
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        block = _EFFNET_BLOCK_KEY.match(key)
        if block is None:
            module, _, rest = key.partition(".")
            if module not in _EFFNET_TOP:
                raise KeyError(f"unexpected key {key!r} for key_map efficientnet_pytorch")
            renamed[f"{_EFFNET_TOP[module]}.{rest}"] = value
            continue
        index, module, rest = int(block[1]), block[2], block[3]
        if index >= len(positions):
            raise KeyError(f"weights have block {index}, the architecture has {len(positions)}")
        names = _EFFNET_IR_BLOCK if index in expands else _EFFNET_DS_BLOCK
        if module not in names:
            raise KeyError(f"unexpected key {key!r} for key_map efficientnet_pytorch")
        stage, position = positions[index]
        renamed[f"blocks.{stage}.{position}.{names[module]}.{rest}"] = value
    return renamed


KEY_MAPS: dict[str, KeyMap] = {"efficientnet_pytorch": efficientnet_pytorch}
