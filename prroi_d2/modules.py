"""``nn.Module`` wrappers of Precise RoI Pooling (no parameters; scriptable, and traceable by ``torch.fx``)."""

from typing import List, Tuple, Union

import torch
from torch import Tensor, nn

from prroi_d2.functional import output_size_pair, prroi_pool2d

__all__ = ["PrRoIPool2D", "PrRoIPool"]

# A leaf of torch.fx traces here too (fx patches the name in the namespace that calls it): symbolic_trace records a
# call of prroi_pool2d instead of tracing into it, where a list of boxes cannot be handled with proxies.
torch.fx.wrap("prroi_pool2d")


class PrRoIPool2D(nn.Module):
    """Precise RoI Pooling with the constructor of the original ``prroi_pool`` package.

    ``forward(features (N, C, H, W), rois (K, 5) or list of (Ki, 4)) -> (K, C, pooled_height, pooled_width)``.
    """

    def __init__(self, pooled_height: int, pooled_width: int, spatial_scale: float, aligned: bool = False):
        super().__init__()
        self.pooled_height = int(pooled_height)
        self.pooled_width = int(pooled_width)
        self.spatial_scale = float(spatial_scale)
        self.aligned = bool(aligned)

    def forward(self, features: Tensor, rois: Union[Tensor, List[Tensor]]) -> Tensor:
        return prroi_pool2d(features, rois, self.pooled_height, self.pooled_width, self.spatial_scale, self.aligned)

    def extra_repr(self) -> str:
        return "pooled_height={}, pooled_width={}, spatial_scale={}, aligned={}".format(
            self.pooled_height, self.pooled_width, self.spatial_scale, self.aligned
        )


class PrRoIPool(PrRoIPool2D):
    """Precise RoI Pooling with the constructor of ``torchvision.ops.RoIAlign``: ``output_size`` int or pair."""

    def __init__(
        self,
        output_size: Union[int, Tuple[int, int], List[int]],
        spatial_scale: float = 1.0,
        aligned: bool = False,
    ):
        pooled_height, pooled_width = output_size_pair(output_size)
        super().__init__(pooled_height, pooled_width, spatial_scale, aligned)
