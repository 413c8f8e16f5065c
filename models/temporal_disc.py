"""TemporalDiscriminator: spectral-normalised spatio-temporal PatchGAN over frame stacks.

Frame-by-frame restorers (RestorerNet on one frame, CompactSR / RRDBNet) are trained
on single images, so nothing stops them from hallucinating slightly different
detail in each frame: the result flickers. Following TecoGAN (Chu et al., "Learning
Temporal Coherence via Self-Supervision for GAN-based Video Generation", ACM TOG
2020), which adds a spatio-temporal discriminator, this D judges short stacks of
consecutive frames, so temporally incoherent detail is what it learns to punish.

Design
    * Besides the raw frames, the frame differences x[:, t] - x[:, t-1] are fed as
      extra channels (zero for the first frame, where no previous frame is known).
      A conv could learn them, but giving them explicitly makes flicker a first-layer
      feature instead of something D must discover (TecoGAN likewise feeds D
      explicit temporal information: warped neighbours).
    * 3D convs, PatchGAN-style (Isola et al., "Image-to-Image Translation with
      Conditional Adversarial Networks", CVPR 2017): two (3, 4, 4) layers mix time
      and space (temporal receptive field 5 frames), one (1, 4, 4) layer is spatial
      only, all stride (1, 2, 2) so time is kept while space shrinks. A (frames, 3, 3)
      conv then collapses time and a last conv gives one logit per patch.
    * Spectral normalisation (Miyato et al., ICLR 2018) on every conv but the output
      one (as Real-ESRGAN's D), via the parametrization API, whose power-iteration
      state is safe when D is called twice (real, fake) before one backward.
    * No normalisation layers: batch statistics would mix real and fake clips.

Tensor contract
    input  x: (B, frames, in_ch, H, W) float in [0, 1]; any H, W >= 16.
    output  : (logits, feats)
              logits: (B, 1, h', w') float, one realness logit per spatio-temporal
                      patch (time collapsed); h' = H // 8, w' = W // 8.
              feats : list of 4 activations (B, C, T or 1, h, w) for a
                      feature-matching loss (models.losses.feature_matching).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm


class TemporalDiscriminator(nn.Module):
    # Three stride-2 layers: below 16 pixels the last level would be 1 pixel or less.
    MIN_SIZE = 16

    def __init__(self, frames: int = 3, in_ch: int = 3, features: int = 32):
        super().__init__()
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
            raise ValueError(f"frames must be an int >= 2 (frame differences need two frames), got {frames!r}")
        if isinstance(in_ch, bool) or not isinstance(in_ch, int) or in_ch < 1:
            raise ValueError(f"in_ch must be a positive int, got {in_ch!r}")
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive int, got {features!r}")
        self.frames = frames
        self.in_ch = in_ch
        f = features

        # Input channels: the frames and their temporal differences.
        self.conv0 = spectral_norm(nn.Conv3d(2 * in_ch, f, (3, 4, 4), (1, 2, 2), (1, 1, 1)))
        self.conv1 = spectral_norm(nn.Conv3d(f, 2 * f, (3, 4, 4), (1, 2, 2), (1, 1, 1)))
        self.conv2 = spectral_norm(nn.Conv3d(2 * f, 4 * f, (1, 4, 4), (1, 2, 2), (0, 1, 1)))
        # Collapses the whole time axis (no temporal padding) into one step: a learned
        # temporal pooling, so each output logit sees every frame of the stack.
        self.conv_time = spectral_norm(nn.Conv3d(4 * f, 4 * f, (frames, 3, 3), 1, (0, 1, 1)))
        self.conv_out = nn.Conv3d(4 * f, 1, (1, 3, 3), 1, (0, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if x.dim() != 5 or x.shape[1] != self.frames or x.shape[2] != self.in_ch:
            raise ValueError(f"expected (B, {self.frames}, {self.in_ch}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h < self.MIN_SIZE or w < self.MIN_SIZE:
            raise ValueError(f"H and W must be >= {self.MIN_SIZE}, got {h}x{w}")

        diff = x[:, 1:] - x[:, :-1]
        # Zero difference for the first frame so diffs align with frames on time.
        diff = torch.cat((torch.zeros_like(x[:, :1]), diff), dim=1)
        # (B, T, 2C, H, W) -> Conv3d layout (B, 2C, T, H, W).
        z = torch.cat((x, diff), dim=2).transpose(1, 2)

        f0 = F.leaky_relu(self.conv0(z), 0.2)
        f1 = F.leaky_relu(self.conv1(f0), 0.2)
        f2 = F.leaky_relu(self.conv2(f1), 0.2)
        f3 = F.leaky_relu(self.conv_time(f2), 0.2)
        logits = self.conv_out(f3).squeeze(2)
        return logits, [f0, f1, f2, f3]
