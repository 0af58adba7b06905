"""Point dragging by latent optimisation (DragVideo, Deng et al. 2023, after DragDiffusion): the
noisy clip x_t is optimised so that the denoiser's features at each handle point move one pixel
towards its target (motion supervision), then each handle is re-found as the nearest feature
match of its starting feature (point tracking), until the handles reach their targets. Per frame,
on effvid's `FactorizedUNet` (the features of one up stage, upsampled to the clip's size).

Training-free apart from the per-video LoRA DragVideo fits first (`experiment=dragvideo`). Left
out: DragVideo's mutual self-attention (the edited clip's attention reading the source's keys
and values while denoising), DDIM inversion of a given clip to x_t and the denoising from x_t
afterwards; `DragEditor.drag` returns the dragged x_t and where the handles went.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lit_models.nets.unet import FactorizedUNet


def features_at(features: Tensor, points: Tensor) -> Tensor:
    """Bilinear features `(N, P, C)` of feature maps `(N, C, H, W)` at points `(N, P, 2)` = (y, x) pixels."""
    height, width = features.shape[-2:]
    grid = torch.stack([2 * points[..., 1] / (width - 1) - 1, 2 * points[..., 0] / (height - 1) - 1], dim=-1)
    sampled = F.grid_sample(features, grid[:, :, None], mode="bilinear", align_corners=True)  # (N, C, P, 1)
    return rearrange(sampled, "n c p 1 -> n p c")


class DragEditor:
    """Drag handle points of a noisy clip towards targets.

    Args:
        up_stage: which of the U-Net's up stages gives the features (DragDiffusion: a middle
            decoder block).
        iterations: optimisation steps at most.
        lr: Adam's step size on x_t.
        patch_radius: motion supervision over the (2r + 1)^2 pixels around each handle.
        search_radius: point tracking searches the (2r + 1)^2 pixels around each handle.
    """

    def __init__(self, up_stage: int = 1, iterations: int = 20, lr: float = 0.01, patch_radius: int = 1,
                 search_radius: int = 2) -> None:
        self.up_stage, self.iterations, self.lr = up_stage, iterations, lr
        self.patch_radius, self.search_radius = patch_radius, search_radius

    def features(self, net: FactorizedUNet, x: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        """The up stage's output for x `(B, C, F, H, W)`, upsampled to `(B*F, C', H, W)`."""
        store: dict[str, Tensor] = {}
        hook = net.up_stages[self.up_stage].register_forward_hook(lambda m, a, out: store.update(out=out))
        try:
            net(x, timesteps, **conditioning)
        finally:
            hook.remove()
        return F.interpolate(store["out"], size=x.shape[-2:], mode="bilinear", align_corners=True)

    def motion_loss(self, features: Tensor, handles: Tensor, targets: Tensor) -> Tensor:
        """Features one pixel from each handle towards its target should become the handle's
        (detached) features, over a patch; `handles`, `targets` `(N, P, 2)`."""
        offset = targets - handles
        step = offset / offset.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        loss = features.new_zeros(())
        radius = self.patch_radius
        for dy, dx in itertools.product(range(-radius, radius + 1), repeat=2):
            points = handles + torch.tensor([dy, dx], dtype=handles.dtype, device=handles.device)
            loss = loss + (features_at(features, points + step) - features_at(features, points).detach()).abs().mean()
        return loss

    def track(self, features: Tensor, start: Tensor, handles: Tensor) -> Tensor:
        """Each handle moved to the pixel within `search_radius` whose feature is closest to its
        starting feature `start` `(N, P, C)`."""
        radius = self.search_radius
        offsets = torch.tensor(list(itertools.product(range(-radius, radius + 1), repeat=2)), dtype=handles.dtype,
                               device=handles.device)  # (K, 2)
        height, width = features.shape[-2:]
        candidates = handles.round()[:, :, None] + offsets  # (N, P, K, 2)
        candidates[..., 0].clamp_(0, height - 1)
        candidates[..., 1].clamp_(0, width - 1)
        found = features_at(features, rearrange(candidates, "n p k two -> n (p k) two"))
        found = rearrange(found, "n (p k) c -> n p k c", k=len(offsets))
        best = (found - start[:, :, None]).abs().sum(dim=-1).argmin(dim=-1)  # (N, P)
        return torch.gather(candidates, 2, best[..., None, None].expand(-1, -1, 1, 2))[:, :, 0]

    def drag(self, net: nn.Module, x_t: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], handles: Tensor,
             targets: Tensor) -> tuple[Tensor, Tensor]:
        """(dragged x_t, final handles `(B, F, P, 2)`) for x_t `(B, C, F, H, W)`, handles and targets
        `(B, F, P, 2)` as (y, x) pixels of the clip."""
        if not isinstance(net, FactorizedUNet):
            raise TypeError(f"DragEditor: needs effvid's FactorizedUNet, got {type(net).__name__}")
        handles, targets = (rearrange(p.float(), "b f p two -> (b f) p two") for p in (handles, targets))
        frozen = [p for p in net.parameters() if p.requires_grad]
        for parameter in frozen:
            parameter.requires_grad_(False)
        try:
            with torch.enable_grad():
                with torch.no_grad():
                    start = features_at(self.features(net, x_t, timesteps, conditioning), handles)
                x = x_t.detach().clone().requires_grad_(True)
                optimizer = torch.optim.Adam([x], lr=self.lr)
                for _ in range(self.iterations):
                    if ((targets - handles).norm(dim=-1) < 1.0).all():
                        break
                    loss = self.motion_loss(self.features(net, x, timesteps, conditioning), handles, targets)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        handles = self.track(self.features(net, x, timesteps, conditioning), start, handles)
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)
        return x.detach(), rearrange(handles, "(b f) p two -> b f p two", b=x_t.shape[0])
