"""The DeepHistReg U-Net, one per pyramid level, with save/load and patch inference.

Architecture (paper Sec. 2, Fig. 1)
    Input: the moving and the fixed patch, one channel each (see
    :func:`wsireg.core.stain.network_input`), concatenated to ``(N, 2, P, P)``. Encoder: ``D``
    levels of 3x3 convolution with stride 2 (instead of max pooling) + GroupNorm + PReLU, so the
    bottleneck is ``P / 2^D``. Decoder: 3x3 transposed convolutions with stride 2 + GroupNorm +
    PReLU, each fed with the previous decoder output concatenated with the encoder output of the
    same resolution (skip connection). Head: a 3x3 conv block and a 3x3 conv to 2 channels, the
    displacement ``(u_x, u_y)`` in pixels of the input patch (:mod:`wsireg.core.coords`), multiplied
    by ``output_scale``. The last conv starts near zero, so an untrained network predicts
    (almost) the identity. ``P`` must be a multiple of ``2^D``.

Defaults and why
    The published code uses ``D = 5`` levels with widths 32..512 on 256 x 256 patches. We keep
    ``D = 5`` but halve every width, 16..256 (a quarter of the parameters; speed and memory:
    ``benchmarks/network_speed.py``, figures in ``wsireg/weights/README.md``). The depth, not
    the width, sets the receptive field: five stride-2 3x3 convolutions, five stride-2 3x3
    transposed convolutions and the two 3x3 head convolutions give a receptive field of 127 px
    (the support of the input gradient of one output pixel with GroupNorm removed; GroupNorm
    statistics are patch-global). As the paper reasons, the patch size follows from it: with
    ``P = 256`` and ``S = 128`` every kept centre pixel is at least ``(P - S) / 2 = 64`` px from
    the patch edge, so its whole receptive field (radius 63) lies inside real context. Halving
    the widths costs capacity, not context; ``UNetConfig(widths=(32, 64, 128, 256, 512),
    head_width=32)`` restores the published size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from wsireg.errors import WsiregError

__all__ = [
    "FORMAT",
    "MultiLevelModel",
    "UNet",
    "UNetConfig",
    "WeightsError",
    "checksum_path",
    "default_weights_path",
    "load_default",
    "num_parameters",
    "resolve_device",
    "sha256_file",
    "verify_checksum",
]

FORMAT = "wsireg.multilevel-unet"
FORMAT_VERSION = 1


class WeightsError(WsiregError):
    """A weights file is missing, corrupted (checksum mismatch) or not a wsireg model."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split()) or "unknown error"
        super().__init__(f"{self.path}: {self.reason}")


# --- device -------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``/``"cuda[:k]"`` as given.

    Raises :class:`~wsireg.errors.WsiregError` if CUDA is asked for but not available.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except (RuntimeError, ValueError) as exc:
            raise WsiregError(f"unknown device {device!r} (use auto, cpu or cuda)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise WsiregError(f"device {device!r} requested but CUDA is not available")
    return resolved


# --- network -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of one :class:`UNet` (JSON-serialisable)."""

    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    """Channels of the ``D = len(widths)`` stride-2 encoder levels (decoder mirrors them)."""
    head_width: int = 16
    """Channels of the full-resolution conv block before the 2-channel output."""
    in_channels: int = 2
    """Moving + fixed, one channel each."""
    norm_groups: int = 8
    """GroupNorm groups (``gcd(norm_groups, channels)`` per layer)."""
    output_scale: float = 1.0
    """Displacement (pixels) per unit of the last layer's output."""

    @property
    def depth(self) -> int:
        """Number of stride-2 levels ``D``."""
        return len(self.widths)

    @property
    def size_multiple(self) -> int:
        """Patch sides must be multiples of ``2^D``."""
        return 2**self.depth

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        data = asdict(self)
        data["widths"] = list(self.widths)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        data = dict(data)
        data["widths"] = tuple(int(w) for w in data.get("widths", cls.widths))
        return cls(**data)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _down(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    """3x3 conv, stride 2 (halves the size) + GroupNorm + PReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), _norm(c_out, groups), nn.PReLU()
    )


def _up(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    """3x3 transposed conv, stride 2 (doubles the size exactly) + GroupNorm + PReLU."""
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1),
        _norm(c_out, groups),
        nn.PReLU(),
    )


class UNet(nn.Module):
    """Displacement network: ``forward(moving, fixed) -> u`` (see module docstring)."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNetConfig()
        w, g = self.config.widths, self.config.norm_groups
        ins = (self.config.in_channels, *w[:-1])
        self.encoder = nn.ModuleList(_down(ins[k], w[k], g) for k in range(len(w)))
        # decoder step k goes from level k+1 to level k; input = previous output (+ skip)
        self.decoder = nn.ModuleList(
            _up(w[k] if k == len(w) - 1 else 2 * w[k], w[max(k - 1, 0)], g)
            for k in reversed(range(len(w)))
        )
        hw = self.config.head_width
        last = nn.Conv2d(hw, 2, 3, padding=1)
        nn.init.normal_(last.weight, std=1e-5)
        nn.init.zeros_(last.bias)
        self.head = nn.Sequential(nn.Conv2d(w[0], hw, 3, padding=1), _norm(hw, g), nn.PReLU(), last)

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """``(N, 1, P, P)`` x 2 -> displacement ``(N, 2, P, P)`` in pixels of the patch."""
        m = self.config.size_multiple
        if moving.shape[-1] % m or moving.shape[-2] % m:
            raise ValueError(f"patch size {tuple(moving.shape[-2:])} is not a multiple of {m}")
        x = torch.cat((moving, fixed), dim=1)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for k, block in enumerate(self.decoder):
            if k:
                x = torch.cat((x, skips.pop()), dim=1)
            x = block(x)
        out = self.head(x)
        scale = self.config.output_scale
        return out if scale == 1.0 else out * scale


def num_parameters(module: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --- multi-level container, save / load -------------------------------------------------------


class MultiLevelModel(nn.Module):
    """One :class:`UNet` per pyramid level, shared by all iterations of that level.

    ``model[k]`` is the network of level ``k``, counted from the **coarsest** level (``k = 0``,
    processed first, as in Algorithm 1). ``metadata`` is free JSON (e.g. patch size, stride,
    input representation, training data) saved with the weights.
    """

    def __init__(
        self,
        configs: Sequence[UNetConfig],
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not configs:
            raise ValueError("a MultiLevelModel needs at least one level")
        self.configs = list(configs)
        self.metadata = dict(metadata or {})
        self.levels = nn.ModuleList(UNet(c) for c in self.configs)

    @classmethod
    def uniform(
        cls, num_levels: int, config: UNetConfig | None = None, **metadata: Any
    ) -> MultiLevelModel:
        """``num_levels`` networks with the same ``config``."""
        return cls([config or UNetConfig()] * num_levels, metadata)

    @property
    def num_levels(self) -> int:
        """Number of pyramid levels (networks)."""
        return len(self.levels)

    def __getitem__(self, level: int) -> UNet:
        return self.levels[level]

    def forward(self, level: int, moving: Tensor, fixed: Tensor) -> Tensor:
        """Displacement of pyramid ``level`` (coarsest = 0)."""
        return self.levels[level](moving, fixed)

    def description(self) -> dict[str, Any]:
        """The JSON config stored with the weights."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "levels": [c.to_dict() for c in self.configs],
            "metadata": self.metadata,
        }

    def save(self, path: str | Path) -> str:
        """Write ``path`` (state dict + JSON config in one ``.pt``) and its checksum sidecar.

        The sidecar :func:`checksum_path` (``<path>.json``) holds the file's sha256, size and
        config. Both are written to temporary names and renamed. Returns the sha256 hex digest.
        """
        path = Path(path)
        payload = {
            "config": json.dumps(self.description(), sort_keys=True),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        digest = sha256_file(tmp)
        manifest = {
            "file": path.name,
            "sha256": digest,
            "bytes": tmp.stat().st_size,
            **self.description(),
        }
        side = checksum_path(path)
        side_tmp = side.with_name(side.name + ".tmp")
        side_tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        os.replace(side_tmp, side)
        return digest

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device = "cpu", verify: bool = True
    ) -> MultiLevelModel:
        """Load a model written by :meth:`save`, in eval mode on ``device``, its weights held
        channels-last (NHWC): the same numbers (to float rounding) through the NHWC convolution
        kernels (``benchmarks/network_speed.py`` compares the layouts).

        With ``verify`` (default) the file's sha256 must match its sidecar; a missing sidecar,
        a mismatch, or a file that is not a wsireg model raise :class:`WeightsError`. Never
        touches the network; tensors are read with ``weights_only=True``.
        """
        path = Path(path)
        if not path.is_file():
            raise WeightsError(path, "weights file not found")
        if verify:
            verify_checksum(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            desc = json.loads(payload["config"])
            if desc.get("format") != FORMAT or desc.get("version") != FORMAT_VERSION:
                raise ValueError(f"format {desc.get('format')!r} v{desc.get('version')!r}")
            model = cls([UNetConfig.from_dict(c) for c in desc["levels"]], desc.get("metadata"))
            model.load_state_dict(payload["state_dict"])
        except Exception as exc:  # any failure means "not a usable wsireg model"
            raise WeightsError(path, f"not a wsireg model file ({exc})") from exc
        return model.to(resolve_device(device), memory_format=torch.channels_last).eval()


def checksum_path(path: str | Path) -> Path:
    """The sidecar manifest of a weights file: ``<path>.json`` (e.g. ``default.pt.json``)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: str | Path) -> str:
    """Check ``path`` against its sidecar; return the digest or raise :class:`WeightsError`."""
    side = checksum_path(path)
    if not side.is_file():
        raise WeightsError(path, f"checksum sidecar {side.name} not found (or load without verify)")
    try:
        expected = json.loads(side.read_text())["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(side, f"unreadable checksum sidecar ({exc})") from exc
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(path, f"sha256 {actual} does not match {expected} in {side.name}")
    return actual


def default_weights_path() -> Path:
    """Where the packaged default weights live: ``wsireg/weights/default.pt``."""
    return Path(str(resources.files("wsireg") / "weights" / "default.pt"))


def load_default(device: str | torch.device = "cpu") -> MultiLevelModel:
    """Load the packaged default model; :class:`WeightsError` if it is not installed."""
    path = default_weights_path()
    if not path.is_file():
        raise WeightsError(
            path,
            "no default weights are installed with this wsireg (train a model and pass its"
            " path, or install a release that ships wsireg/weights/default.pt)",
        )
    return MultiLevelModel.load(path, device=device)
