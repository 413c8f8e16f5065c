"""UNetDiscriminatorSN: per-pixel U-Net discriminator with spectral normalisation.

Follows the discriminator of Real-ESRGAN (Wang et al., "Real-ESRGAN: Training
Real-World Blind Super-Resolution with Pure Synthetic Data", ICCVW 2021, Sec. 3.3):
a U-Net (conv0, three stride-2 downsampling convs F -> 2F -> 4F -> 8F, bilinear
upsampling back with additive skips, two extra convs) whose last conv gives one
realness logit *per pixel*. Per-pixel feedback suits restoration, where a frame is
mostly right and the artefacts are local; the U-Net's global path still judges
overall structure. Spectral normalisation (Miyato et al., "Spectral Normalization
for Generative Adversarial Networks", ICLR 2018) keeps D 1-Lipschitz per layer,
which Real-ESRGAN needs to keep the stronger U-Net D from destabilising training.

Tensor contract
    input  x: (B, in_ch, H, W) float in [0, 1]; any H, W (odd sizes included).
    output  : (logits, feats)
              logits: (B, 1, H, W) float, realness logits (unbounded, no sigmoid).
              feats : list of 7 activations (conv0, the three down convs, the three
                      up convs), at the input size replicate-padded to a multiple
                      of 8, for a feature-matching loss (models.losses.feature_matching).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm


def _sn(module: nn.Module) -> nn.Module:
    # The parametrization API, not the older hook-based torch.nn.utils.spectral_norm
    # (which the PyTorch docs say will be deprecated): power iteration updates the
    # _u / _v buffers in place under no_grad and the weight is normalised with
    # *clones* of them, so calling D twice in train mode (D(real), D(fake)) before a
    # single backward of the summed loss does not trip autograd's "modified by an
    # inplace operation" check. It also starts from 15 power iterations at
    # registration rather than random singular vectors, so sigma is right from the
    # first step.
    return spectral_norm(module)


class UNetDiscriminatorSN(nn.Module):
    # Three stride-2 levels: sizes must be divisible by 2^3 for the skips to line up.
    MULTIPLE = 8

    def __init__(self, in_ch: int = 3, features: int = 64, skip: bool = True):
        super().__init__()
        if isinstance(in_ch, bool) or not isinstance(in_ch, int) or in_ch < 1:
            raise ValueError(f"in_ch must be a positive int, got {in_ch!r}")
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive int, got {features!r}")
        if not isinstance(skip, bool):
            raise ValueError(f"skip must be a bool, got {skip!r}")
        self.in_ch = in_ch
        self.skip = skip
        f = features

        # As Real-ESRGAN: conv0 and the 1-channel output conv are left plain (with
        # bias); every conv in between is spectral-normalised and bias-free.
        self.conv0 = nn.Conv2d(in_ch, f, 3, 1, 1)
        # Downsampling: 4x4 stride-2 convs (as DCGAN / PatchGAN), F -> 2F -> 4F -> 8F.
        self.conv1 = _sn(nn.Conv2d(f, 2 * f, 4, 2, 1, bias=False))
        self.conv2 = _sn(nn.Conv2d(2 * f, 4 * f, 4, 2, 1, bias=False))
        self.conv3 = _sn(nn.Conv2d(4 * f, 8 * f, 4, 2, 1, bias=False))
        # Upsampling: bilinear x2 then a 3x3 conv (no transposed convs: no checkerboard).
        self.conv4 = _sn(nn.Conv2d(8 * f, 4 * f, 3, 1, 1, bias=False))
        self.conv5 = _sn(nn.Conv2d(4 * f, 2 * f, 3, 1, 1, bias=False))
        self.conv6 = _sn(nn.Conv2d(2 * f, f, 3, 1, 1, bias=False))
        # Extra convolutions at full resolution.
        self.conv7 = _sn(nn.Conv2d(f, f, 3, 1, 1, bias=False))
        self.conv8 = _sn(nn.Conv2d(f, f, 3, 1, 1, bias=False))
        self.conv9 = nn.Conv2d(f, 1, 3, 1, 1)

    @staticmethod
    def _act(x: torch.Tensor) -> torch.Tensor:
        # Not in-place (Real-ESRGAN uses inplace=True): the activations are returned
        # as feats and must stay intact for the feature-matching loss and autograd.
        return F.leaky_relu(x, negative_slope=0.2)

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if x.dim() != 4 or x.shape[1] != self.in_ch:
            raise ValueError(f"expected (B, {self.in_ch}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        # Replicate-pad to a multiple of 8 (works even for 1-pixel inputs, unlike
        # reflect) so every level halves exactly; the logits are cropped back.
        pad_h, pad_w = -h % self.MULTIPLE, -w % self.MULTIPLE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")

        x0 = self._act(self.conv0(x))
        x1 = self._act(self.conv1(x0))
        x2 = self._act(self.conv2(x1))
        x3 = self._act(self.conv3(x2))

        x4 = self._act(self.conv4(self._up(x3)))
        if self.skip:
            x4 = x4 + x2
        x5 = self._act(self.conv5(self._up(x4)))
        if self.skip:
            x5 = x5 + x1
        x6 = self._act(self.conv6(self._up(x5)))
        if self.skip:
            x6 = x6 + x0

        out = self._act(self.conv7(x6))
        out = self._act(self.conv8(out))
        logits = self.conv9(out)[..., :h, :w]
        return logits, [x0, x1, x2, x3, x4, x5, x6]
