"""The classification RoI batch (spec §4.2): ranked (proposal, class) candidates for the image head.

torchvision's ``RoIHeads.postprocess_detections`` cannot return the regression deltas or
the per-candidate softmax scores, and it drops small boxes, so the batch is built here
from the raw box-branch outputs, with stock ``BoxCoder``, ``clip_boxes_to_image`` and
``batched_nms``:

1. every (proposal, foreground class) pair is a candidate, scored by the softmax over all
   classes, carrying that class's raw regression deltas ``(tx, ty, tw, th)``;
2. candidates whose decoded, clipped box has area ``<= min_area`` are dropped (the
   original's score cut at -0.01 keeps every softmax score, so it is not repeated);
3. class-wise NMS on the decoded boxes, sorted by decreasing score, first ``num_rois`` kept;
4. fewer than ``num_rois`` survivors are padded by order-preserving repetition with
   random run lengths (:func:`repeat_pad_indices`); none at all gives zero rows.

The same procedure selects the beta RoIs of the mask-feature models (spec §6.1, NMS 0.25);
:func:`distance_order` is the LSTM/Attention order of those RoIs (spec §7.1, §10 #20).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import boxes as box_ops

__all__ = ["RoIBatch", "repeat_pad_indices", "build_roi_batch", "distance_order"]


@dataclass
class RoIBatch:
    """The head's input for one image.

    ``rows``: ``[N, 5]`` = ``[score, tx, ty, tw, th]``, rank order (decreasing score).
    ``boxes``: ``[N, 4]`` decoded, clipped boxes of the rows (model-input coordinates).
    ``labels``: ``[N]`` foreground class of each row (0 for zero-filled rows).
    ``num_survivors``: candidates left after NMS, before padding (0 = all rows are zeros).
    """

    rows: Tensor
    boxes: Tensor
    labels: Tensor
    num_survivors: int

    @property
    def scores(self) -> Tensor:
        return self.rows[:, 0]


def repeat_pad_indices(k: int, n: int, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> Tensor:
    """Indices ``[n]`` into ``k`` ranked survivors: each appears at least once, in rank
    order, with random run lengths (the original code's scheme, spec §4.2 step 7).

    ``k - 1`` distinct cut points are drawn from ``1..n-2`` and sorted; with the bounds
    0 and ``n`` they split ``0..n-1`` into ``k`` runs, run ``j`` holding survivor ``j``.
    (The last run is therefore at least 2 long, exactly as in the original.)
    """
    if not 0 < k <= n:
        raise ValueError(f"need 0 < k <= n, got k={k}, n={n}")
    if k == n:
        return torch.arange(n, device=device)
    if k > 1 and n - 2 < k - 1:
        # Only reachable for n <= 2, where the original's cut range 1..n-2 is empty.
        cuts = torch.arange(1, k)
    else:
        cuts = torch.randperm(n - 2, generator=generator)[: k - 1].sort().values + 1
    bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])])
    lengths = bounds[1:] - bounds[:-1]
    return torch.repeat_interleave(torch.arange(k), lengths).to(device)


def build_roi_batch(
    proposals: Tensor,
    class_logits: Tensor,
    box_regression: Tensor,
    image_size: tuple[int, int],
    *,
    num_rois: int,
    nms_thresh: float = 0.75,
    min_area: float = 1e-5,
    box_coder: BoxCoder | None = None,
    generator: torch.Generator | None = None,
) -> RoIBatch:
    """Build one image's classification RoI batch from its box-branch outputs.

    Args:
        proposals: ``[R, 4]`` RPN proposals (detached by the caller or not; the deltas
            and scores keep their gradient, the boxes are only used for ranking).
        class_logits: ``[R, K]`` box-predictor logits, K including background.
        box_regression: ``[R, 4K]`` class-specific deltas in the (10, 10, 5, 5) encoding.
        image_size: ``(height, width)`` of the model input, for clipping.
        num_rois: N, the number of rows returned.
        nms_thresh: class-wise NMS IoU (0.75 CTM/SSM, 0.25 Affinity/LSTM).
        min_area: candidates with decoded box area ``<= min_area`` are dropped.
        generator: random source for the padding run lengths (None: global RNG).
    """
    if class_logits.dim() != 2 or box_regression.shape != (class_logits.shape[0], 4 * class_logits.shape[1]):
        raise ValueError(
            f"class_logits [R, K] and box_regression [R, 4K] expected, got {tuple(class_logits.shape)} "
            f"and {tuple(box_regression.shape)}"
        )
    box_coder = box_coder or BoxCoder((10.0, 10.0, 5.0, 5.0))
    num_props, num_classes = class_logits.shape
    device = class_logits.device

    scores = F.softmax(class_logits, -1)[:, 1:].reshape(-1)
    deltas = box_regression.reshape(num_props, num_classes, 4)[:, 1:].reshape(-1, 4)
    decoded = box_coder.decode(box_regression.detach(), [proposals.detach()]).reshape(num_props, num_classes, 4)
    decoded = box_ops.clip_boxes_to_image(decoded, image_size)[:, 1:].reshape(-1, 4)
    labels = torch.arange(1, num_classes, device=device).repeat(num_props)

    area = (decoded[:, 2] - decoded[:, 0]) * (decoded[:, 3] - decoded[:, 1])
    ok = torch.nonzero(area > min_area).squeeze(1)
    keep = ok[box_ops.batched_nms(decoded[ok], scores[ok].detach(), labels[ok], nms_thresh)][:num_rois]

    k = int(keep.numel())
    if k == 0:
        return RoIBatch(
            rows=class_logits.new_zeros((num_rois, 5)) + 0 * class_logits.sum(),  # keeps the graph
            boxes=class_logits.new_zeros((num_rois, 4)),
            labels=torch.zeros(num_rois, dtype=torch.int64, device=device),
            num_survivors=0,
        )
    if k < num_rois:
        keep = keep[repeat_pad_indices(k, num_rois, generator).to(device)]
    rows = torch.cat([scores[keep, None], deltas[keep]], dim=1)
    return RoIBatch(rows=rows, boxes=decoded[keep], labels=labels[keep], num_survivors=k)


def distance_order(boxes: Tensor, code: bool = False) -> Tensor:
    """Indices that sort boxes ``[beta, 4]`` (x1, y1, x2, y2) by the Euclidean distance from
    the image origin (0, 0) to the top-left corner (x1, y1), ascending (closest first).

    Stable: equal distances keep their input (confidence-rank) order. The distance is
    compared squared, in float64, so ties are exact. Returns a ``long`` tensor ``[beta]``.
    ``code=True`` is the original code's expression instead (``roi_order: distance_code``).
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"distance_order expects boxes [n, 4], got {tuple(boxes.shape)}")
    if code:
        # The LSTM code's expression: float32 sqrt(x1^2 + y1^2), torch's default (unstable)
        # sort. Equal distances then come out in whatever order that sort gives.
        return torch.sqrt(boxes[:, 0] ** 2 + boxes[:, 1] ** 2).sort().indices
    xy = boxes[:, :2].to(torch.float64)
    d2 = (xy * xy).sum(dim=1)
    return torch.sort(d2, stable=True).indices
