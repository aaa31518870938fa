"""3-D connected components of a binary volume given one slice at a time.

:class:`Components3D` gives what ``scipy.ndimage.label(mask, structure=np.ones((3, 3, 3)))``
gives (26-connectivity), with the same numbering (components numbered by their first
voxel in raster order ``(slice, row, column)``), without holding the volume:

* pass 1, :meth:`Components3D.add` for slices ``0, 1, ...`` in order: each slice is
  labelled in 2-D (8-connectivity; 4 for 6-connectivity) and its components are joined
  (union-find) to those of the previous slice that they touch (diagonals included for
  26-connectivity); per component the voxel
  count, first voxel, slice range, coordinate sums and whether it touches the in-plane
  border are kept;
* :meth:`Components3D.finish` numbers the joined components;
* pass 2, :meth:`Components3D.labels` gives a slice's component numbers (its 2-D labels
  are computed again, the same way).

Memory: two slices of 2-D labels and a few numbers per 2-D component, never the volume.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["Components3D"]

_EIGHT = np.ones((3, 3), dtype=bool)
_FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


class Components3D:
    """26- (or 6-) connected components of a ``[S, H, W]`` binary volume fed slice by slice.

    After :meth:`finish`: ``count`` components numbered ``1..count``; ``sizes[k]`` voxels
    (``sizes[0] == 0``), ``first_slice[k]`` / ``last_slice[k]``, ``centroids[k]``
    ``(z, y, x)`` and ``touches_border[k]`` (the in-plane image border) for ``k >= 1``.
    """

    def __init__(self, height: int, width: int, connectivity: int = 26) -> None:
        if connectivity not in (6, 26):
            raise ValueError(f"connectivity must be 6 or 26, not {connectivity!r}")
        self.shape2d = (int(height), int(width))
        self._structure = _EIGHT if connectivity == 26 else _FOUR
        self._shifts = (-1, 0, 1) if connectivity == 26 else (0,)
        self._parent: list[int] = [0]       # provisional id -> parent (id 0: background)
        self._offsets: list[int] = []       # slice -> provisional id of its label 0
        self._stats: list[np.ndarray] = []  # per slice [n, 6]: voxels, first, sum z, sum y, sum x, border
        self._prev: np.ndarray | None = None
        rows, cols = np.indices(self.shape2d)
        self._rows, self._cols = rows.ravel().astype(np.float64), cols.ravel().astype(np.float64)
        self.count = 0
        self._lut: np.ndarray | None = None

    @property
    def num_slices(self) -> int:
        return len(self._offsets)

    def _find(self, i: int) -> int:
        parent = self._parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def _label2d(self, mask: np.ndarray) -> tuple[np.ndarray, int]:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.shape2d:
            raise ValueError(f"slice is {mask.shape}, the volume's slices are {self.shape2d}")
        return ndimage.label(mask, structure=self._structure)

    def add(self, mask: np.ndarray) -> None:
        """Pass 1: the next slice's binary mask ``[H, W]``."""
        if self._lut is not None:
            raise RuntimeError("add() after finish()")
        s = self.num_slices
        lab, n = self._label2d(mask)
        offset = len(self._parent) - 1
        self._offsets.append(offset)
        h, w = self.shape2d
        if n:
            flat = lab.ravel()
            ids, first = np.unique(flat, return_index=True)
            first_of = np.zeros(n + 1, dtype=np.int64)
            first_of[ids] = first
            voxels = np.bincount(flat, minlength=n + 1)
            border = np.zeros(n + 1, dtype=np.int64)
            border[np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))] = 1
            stats = np.stack([
                voxels, s * h * w + first_of, s * voxels,
                np.bincount(flat, weights=self._rows, minlength=n + 1),
                np.bincount(flat, weights=self._cols, minlength=n + 1), border,
            ], axis=1).astype(np.float64)[1:]
            self._stats.append(stats)
            self._parent.extend(range(offset + 1, offset + n + 1))
            if self._prev is not None:
                self._join(self._prev, self._offsets[s - 1], lab, offset)
        self._prev = lab if n else None

    def _join(self, prev: np.ndarray, prev_offset: int, cur: np.ndarray, offset: int) -> None:
        """Union the components of two neighbouring slices that touch (9 in-plane shifts)."""
        h, w = self.shape2d
        keys = []
        for dy in self._shifts:
            for dx in self._shifts:
                a = prev[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
                b = cur[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
                both = (a > 0) & (b > 0)
                if both.any():
                    keys.append((a[both].astype(np.int64) + prev_offset) * (1 << 32) + (b[both] + offset))
        if keys:
            for key in np.unique(np.concatenate(keys)).tolist():
                self._union(key >> 32, key & 0xFFFFFFFF)

    def finish(self) -> "Components3D":
        """Number the components (by first voxel in raster order, as ``scipy.ndimage.label``)."""
        if self._lut is not None:
            return self
        total = len(self._parent) - 1
        stats = np.concatenate(self._stats) if self._stats else np.zeros((0, 6))
        roots = np.asarray([self._find(i) for i in range(1, total + 1)], dtype=np.int64)
        unique_roots, member_of = np.unique(roots, return_inverse=True)
        n = len(unique_roots)
        first = np.full(n, np.inf)
        np.minimum.at(first, member_of, stats[:, 1])
        order = np.argsort(first, kind="stable")   # component rank by first voxel
        number = np.empty(n, dtype=np.int64)
        number[order] = np.arange(1, n + 1)
        lut = np.zeros(total + 1, dtype=np.int64)
        lut[1:] = number[member_of]
        agg = np.zeros((n + 1, 6))
        np.add.at(agg, number[member_of], stats)
        zmin = np.full(n + 1, np.iinfo(np.int64).max, dtype=np.int64)
        zmax = np.full(n + 1, -1, dtype=np.int64)
        slice_of = np.repeat(np.arange(self.num_slices), np.diff(np.append(self._offsets, total)))
        np.minimum.at(zmin, lut[1:], slice_of)
        np.maximum.at(zmax, lut[1:], slice_of)
        self.count = n
        self.sizes = agg[:, 0].astype(np.int64)
        self.first_slice, self.last_slice = zmin, zmax
        with np.errstate(invalid="ignore", divide="ignore"):
            self.centroids = agg[:, 2:5] / agg[:, :1]
        self.touches_border = agg[:, 5] > 0
        self._lut = lut.astype(np.uint32 if n < 2 ** 32 else np.int64)
        self._prev = None
        return self

    def labels(self, s: int, mask: np.ndarray) -> np.ndarray:
        """Pass 2: component numbers ``[H, W]`` (0 outside) of slice ``s``, whose mask is ``mask``
        (the same mask :meth:`add` was given)."""
        if self._lut is None:
            raise RuntimeError("labels() before finish()")
        lab, _ = self._label2d(mask)
        return self._lut[np.where(lab > 0, lab + self._offsets[s], 0)]
