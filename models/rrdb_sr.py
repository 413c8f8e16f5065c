"""RRDBNet: ESRGAN's Residual-in-Residual Dense Block generator (x2 / x4).

Follows ESRGAN (Wang et al., "ESRGAN: Enhanced Super-Resolution Generative
Adversarial Networks", ECCVW 2018): a deep body of RRDBs at the low resolution,
each made of three Residual Dense Blocks (dense connections as in RDN, Zhang et al.
CVPR 2018) with residual scaling 0.2, a long skip over the whole body, then one
nearest-neighbour x2 upsampling + conv per x2 step. It is the larger option for GPU
clusters (16.7M parameters at the default size, vs ~0.26M for CompactSR's
default); CompactSR stays the default.

Departures from ESRGAN, to share CompactSR's "do no harm at init" convention:
    * a global residual equal to the bilinear upscale of the input is added, and
    * the last conv is zero-initialised,
so a freshly initialised net outputs exactly the bilinear upscale and only has to
learn the detail on top of it.

Tensor contract
    input  x: (B, 3, H, W) float in [0, 1]; any H, W.
    output  : (B, 3, H*scale, W*scale) float, not clamped.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# ESRGAN Sec. 3.2: scaling residuals by a constant in (0, 1) before adding them
# back keeps the very deep body (23 RRDB x 3 RDB) stable without batch norm.
RESIDUAL_SCALE = 0.2


def _scaled_kaiming_(convs: list[nn.Conv2d], scale: float = 0.1) -> None:
    # ESRGAN's "smaller initialisation": Kaiming init scaled by 0.1 makes each
    # residual start near the identity, which the paper found eases training of the
    # deep residual-in-residual body.
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight)
        with torch.no_grad():
            conv.weight.mul_(scale)
        nn.init.zeros_(conv.bias)


class ResidualDenseBlock(nn.Module):
    """Five densely connected convs; each sees the block input and all previous outputs."""

    def __init__(self, features: int, growth: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(features + i * growth, growth, 3, 1, 1) for i in range(4)
        )
        self.conv_fuse = nn.Conv2d(features + 4 * growth, features, 3, 1, 1)
        _scaled_kaiming_([*self.convs, self.conv_fuse])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(F.leaky_relu(conv(torch.cat(feats, dim=1)), 0.2))
        return x + RESIDUAL_SCALE * self.conv_fuse(torch.cat(feats, dim=1))


class RRDB(nn.Module):
    """Residual-in-residual: three dense blocks behind one more scaled skip."""

    def __init__(self, features: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(*(ResidualDenseBlock(features, growth) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + RESIDUAL_SCALE * self.body(x)


class RRDBNet(nn.Module):
    def __init__(self, scale: int = 4, features: int = 64, blocks: int = 23, growth: int = 32):
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, int) or scale not in (2, 4):
            raise ValueError(f"scale must be 2 or 4 (x2 upsampling steps), got {scale!r}")
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive int, got {features!r}")
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks must be a positive int, got {blocks!r}")
        if isinstance(growth, bool) or not isinstance(growth, int) or growth < 1:
            raise ValueError(f"growth must be a positive int, got {growth!r}")
        self.scale = scale

        self.conv_first = nn.Conv2d(3, features, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        # One nearest x2 + conv per step (ESRGAN): nearest + conv avoids the
        # checkerboard artefacts of transposed convs (Odena et al., Distill 2016).
        self.ups = nn.ModuleList(
            nn.Conv2d(features, features, 3, 1, 1) for _ in range(scale.bit_length() - 1)
        )
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, 3, 3, 1, 1)

        # Zero-init the last conv: a fresh net outputs exactly the bilinear upscale.
        nn.init.zeros_(self.conv_last.weight)
        nn.init.zeros_(self.conv_last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W), got {tuple(x.shape)}")
        base = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))  # long skip over the whole body
        for conv in self.ups:
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2)) + base
