"""The Affinity head of paper 000 (spec §6.2): affinity layer + image classifier.

For ONE image, mask features ``R [beta, C, 28, 28]`` (rows in confidence-rank order,
spec §6.1: row k of W is tied to rank k) go through

1. refinement (N blocks) and vectorisation -> ``X [beta, C]``;
2. affinity matrix ``W [beta, C*]`` (standard-normal init): ``Y = W^T X  [C*, C]``,
   ``y_{r,j} = sum_k w_{k,r} x_{k,j}`` (paper Eqs. 3-4);
3. affinity vector ``v [C*]`` (standard-normal init): ``z = Y^T v  [C]``,
   ``z_j = sum_r y_{r,j} v_r`` (paper Eqs. 6-7);
4. image classifier on ``z`` -> logits ``[num_classes]``.

The two factors are applied explicitly, as written. ``z = X^T (W v)``, so ``W v [beta]``
is the single weight each RoI gets; it is returned as ``roi_weights`` for explainability.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .mask_features import ImageClassifier, MaskFeatureHead, Refinement, Vectorisation

__all__ = ["AffinityLayer", "AffinityHead"]


class AffinityLayer(nn.Module):
    """Refinement + vectorisation + affinity matrix ``W`` and vector ``v``."""

    def __init__(self, channels: int, rois: int, affinity_dim: int, blocks: int, shared_refinement: bool) -> None:
        super().__init__()
        self.refinement = Refinement(channels, blocks=blocks, shared=shared_refinement)
        self.vectorisation = Vectorisation(channels)
        self.affinity_matrix = nn.Parameter(torch.randn(rois, affinity_dim))   # W [beta, C*]
        self.affinity_vector = nn.Parameter(torch.randn(affinity_dim))         # v [C*]

    def forward(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """``X [beta, C] -> (z [C], Y [C*, C])``."""
        Y = self.affinity_matrix.t() @ X          # Eq. 3: Y = W^T X, [C*, C]
        z = Y.t() @ self.affinity_vector          # Eq. 6: z = Y^T v, [C]
        return z, Y


class AffinityHead(MaskFeatureHead):
    """Affinity layer + image classifier (paper 000; spec §6.2).

    Args:
        channels: C, channels of the mask features (256).
        rois: beta, RoIs per image (8); ``W`` has one row per RoI rank.
        affinity_dim: C* (8/16/32/64 in the paper).
        num_classes: image classes (3; 2 for iCTCF).
        blocks: N refinement blocks (3).
        shared_refinement: original-code refinement (one block applied N^2 times).

    ``forward(R [beta, C, 28, 28]) -> (logits [num_classes], roi_weights [beta])`` with
    ``roi_weights = W v``. ``from_vectors(X [beta, C])`` runs steps 2-4 only.
    Parameters: ``layer.refinement``, ``layer.vectorisation``, ``layer.affinity_matrix``
    (W), ``layer.affinity_vector`` (v), ``classifier``.
    """

    def __init__(self, channels: int = 256, rois: int = 8, affinity_dim: int = 16, num_classes: int = 3,
                 blocks: int = 3, shared_refinement: bool = False) -> None:
        super().__init__()
        self.channels = int(channels)
        self.rois = int(rois)
        self.affinity_dim = int(affinity_dim)
        self.num_classes = int(num_classes)
        self.layer = AffinityLayer(self.channels, self.rois, self.affinity_dim, blocks, shared_refinement)
        self.classifier = ImageClassifier(self.channels, self.num_classes)

    def from_vectors(self, X: Tensor) -> tuple[Tensor, Tensor]:
        self._check_vectors(X, self.rois)
        z, _ = self.layer(X)
        logits = self.classifier(z)
        roi_weights = self.layer.affinity_matrix @ self.layer.affinity_vector   # W v, [beta]
        return logits, roi_weights
