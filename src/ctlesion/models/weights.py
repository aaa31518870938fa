"""Local ImageNet weights for the backbones and benchmark CNNs (no download is possible).

``.safetensors`` or ``.pth`` (read with ``weights_only=True``: an untrusted file never
executes code); ``{"state_dict": ...}`` wrappers, ``module.`` prefixes (DataParallel) and
torchvision's old DenseNet key layout are accepted.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["read_state_dict", "load_local_weights"]

# torchvision's released DenseNet files use the old key layout
# ("denselayer1.norm.1.weight"); the current modules are named "norm1" (torchvision
# remaps them the same way in ``densenet._load_state_dict``).
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A local weights file as ``{name: tensor}`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{path}: not a state dict (a mapping of names to tensors)")
    out = {}
    for key, value in state.items():
        if key.startswith("module."):  # saved from nn.DataParallel
            key = key[len("module."):]
        match = _OLD_DENSENET_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def load_local_weights(net: nn.Module, path: str | Path, head: str, keep_head: bool) -> list[str]:
    """Load ``path`` into ``net``; every key except the final layer ``head`` must be present
    with the right shape (``num_batches_tracked``, absent from old files, may be missing).

    ``keep_head=False`` ignores the head entirely (a backbone); ``True`` loads it where its
    shape fits and skips it where it differs (another class count). Returns the skipped keys.
    """
    state = read_state_dict(path)
    own = net.state_dict()
    prefix = head + "."
    if keep_head:
        skipped = sorted(k for k, v in state.items()
                         if k.startswith(prefix) and k in own and tuple(v.shape) != tuple(own[k].shape))
    else:
        skipped = sorted(k for k in state if k.startswith(prefix))
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = {k for k in own if k not in state and not k.startswith(prefix) and not k.endswith("num_batches_tracked")}
    unexpected = set(state) - set(own)
    bad_shape = sorted(k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or bad_shape:
        raise ConfigError(
            f"{path}: not a state dict for this architecture "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}, wrong shape {bad_shape[:5]})"
        )
    net.load_state_dict(state, strict=False)
    return skipped
