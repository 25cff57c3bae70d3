"""Ground geometry for a Task: flat plane, rough heightfield, slope or stairs, in one PyBullet client.

The plane from plane.urdf is always there. A slope tilts it (exact and unbounded); rough ground and
stairs are a heightfield over `TERRAIN_SIZE` centred on the spawn point, generated with a numpy
Generator seeded from the task, with the plane lowered by `CATCH_DROP` beneath it to catch a robot
that walks off the edge. A task whose terrain parameters make it flat (amplitude, slope or step
height 0) gets the plane, so the nominal world is the one it always was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pybullet

FLAT, ROUGH, SLOPE, STAIRS = 0, 1, 2, 3
TERRAIN_SIZE = (16.0, 6.0)
"""Extent (m) of a heightfield along x (the walking direction) and y, centred on the spawn point: 16 s of walking
at 0.5 m/s either way. PyBullet keeps ~2 kB per grid point (~75 MB for this one per world), so it is not larger."""
TERRAIN_RESOLUTION = 0.05
"""Heightfield grid spacing (m): a stair riser is a 5 cm wide ramp between two grid points."""
CATCH_DROP = 0.05
"""How far (m) the plane sits below z = 0 under a heightfield."""
SPAWN_RADIUS = 0.35
"""Radius (m) around the spawn point whose highest ground point sets the spawn height."""
STAIRS_LANDING = 0.5
"""Half-width (m) of the flat landing at the spawn point before the first step."""
STAIRS_PER_FLIGHT = 8
"""Steps up, then as many down, repeating outwards in both x directions."""
MAX_HEIGHT = 2.5
"""Highest heightfield point (m) the terrain may have (stairs: STAIRS_PER_FLIGHT * 0.25 m risers = 2 m)."""
PARKED_Z = -100.0
"""Where the heightfield waits (m) while the ground is the plane."""


@dataclass(frozen=True)
class TerrainParams:
    """The terrain part of a Task; parameters the kind does not use are zeroed, so equal terrains compare equal."""

    kind: int = FLAT
    amplitude: float = 0.0
    feature: float = 0.0
    slope: float = 0.0
    step_height: float = 0.0
    seed: int = 0

    @classmethod
    def from_task(cls, task) -> TerrainParams:
        """The terrain a `sim.tasks.Task` asks for (duck-typed: terrain.py does not import tasks)."""
        kind = int(task.terrain)
        if kind == ROUGH and task.terrain_amplitude > 0:
            return cls(ROUGH, amplitude=task.terrain_amplitude, feature=task.terrain_feature, seed=int(task.seed))
        if kind == SLOPE and task.slope != 0:
            return cls(SLOPE, slope=task.slope)
        if kind == STAIRS and task.step_height > 0:
            return cls(STAIRS, feature=task.terrain_feature, step_height=task.step_height)
        return cls()


def grid(size: tuple[float, float] = TERRAIN_SIZE, resolution: float = TERRAIN_RESOLUTION) -> tuple[np.ndarray, ...]:
    """Grid coordinates x (nx,) and y (ny,), symmetric about 0."""
    nx, ny = (int(round(extent / resolution)) + 1 for extent in size)
    return (np.arange(nx) - (nx - 1) / 2) * resolution, (np.arange(ny) - (ny - 1) / 2) * resolution


def _upsample(coarse: np.ndarray, spacing: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of coarse[cy, cx] (grid origin at x[0], y[0], given spacing) onto y x x."""

    def weights(points: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        position = (points - points[0]) / spacing
        index = np.minimum(np.floor(position).astype(int), count - 2)
        return index, position - index

    ix, wx = weights(x, coarse.shape[1])
    iy, wy = weights(y, coarse.shape[0])
    rows = coarse[:, ix] * (1.0 - wx) + coarse[:, ix + 1] * wx  # (cy, nx)
    return rows[iy] * (1.0 - wy)[:, None] + rows[iy + 1] * wy[:, None]


def heightmap(params: TerrainParams, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ground heights H[iy, ix] (m, all >= 0) of a rough or stairs terrain on the grid x (nx,), y (ny,).

    Rough: heights uniform in [0, amplitude] on a grid of spacing `feature`, bilinearly interpolated.
    Stairs: h(x) = step_height * min(k mod 2P, 2P - k mod 2P), k = floor((|x| - landing) / tread) + 1
    beyond the landing (P = STAIRS_PER_FLIGHT): flights up then down, constant along y.
    """
    if params.kind == ROUGH:
        rng = np.random.default_rng(params.seed)
        spacing = max(params.feature, x[1] - x[0])
        count_x = int(math.ceil((x[-1] - x[0]) / spacing)) + 2
        count_y = int(math.ceil((y[-1] - y[0]) / spacing)) + 2
        coarse = rng.uniform(0.0, params.amplitude, (count_y, count_x))
        return _upsample(coarse, spacing, x, y)
    if params.kind == STAIRS:
        distance = np.abs(x) - STAIRS_LANDING
        step = np.where(distance >= 0, np.floor(distance / params.feature) + 1, 0).astype(int)
        phase = step % (2 * STAIRS_PER_FLIGHT)
        profile = params.step_height * np.minimum(phase, 2 * STAIRS_PER_FLIGHT - phase)
        return np.broadcast_to(profile, (len(y), len(x))).copy()
    raise ValueError(f"terrain kind {params.kind} has no heightmap; heightfield kinds: {ROUGH} (rough), {STAIRS}")


class Ground:
    """The ground bodies of one PyBullet client; `build` switches terrain, rebuilding only on a change.

    The heightfield is created once, on first use, and then only has its heights replaced: PyBullet cannot free a
    heightfield shape once a body used it (about 40 MB leaked per rebuild), and a replaced shape keeps the height
    range it was created with, so it is created spanning [0, MAX_HEIGHT] and placed so that data height h is
    world height h. When the ground is not a heightfield it is parked far below the plane.
    """

    def __init__(self, client, plane: int) -> None:
        self.client = client
        self.plane = plane
        self.params = TerrainParams()
        self.heightfield: int | None = None
        self._shape: int | None = None
        self._heights: np.ndarray | None = None
        self._x, self._y = grid()

    @property
    def bodies(self) -> list[int]:
        """Every body the robot can stand on (ground properties apply to all of them)."""
        return [self.plane] if self._heights is None else [self.heightfield, self.plane]

    def build(self, params: TerrainParams) -> bool:
        """Make the world's ground match `params`; returns True if anything changed (saved states are stale)."""
        if params == self.params:
            return False
        client = self.client
        plane_z, plane_pitch = 0.0, 0.0
        self._heights = None
        if params.kind == SLOPE:
            plane_pitch = -params.slope  # the normal (-sin a, 0, cos a): uphill towards +x
        elif params.kind in (ROUGH, STAIRS):
            self._heights = heightmap(params, self._x, self._y)
            self._set_heights(self._heights)
            plane_z = -CATCH_DROP
        if self.heightfield is not None:
            z = 0.5 * MAX_HEIGHT if self._heights is not None else PARKED_Z
            client.resetBasePositionAndOrientation(self.heightfield, [0.0, 0.0, z], [0, 0, 0, 1])
        client.resetBasePositionAndOrientation(
            self.plane, [0.0, 0.0, plane_z], client.getQuaternionFromEuler([0.0, plane_pitch, 0.0])
        )
        self.params = params
        return True

    def _set_heights(self, heights: np.ndarray) -> None:
        client = self.client
        # PyBullet reads the data as index ix + iy * nx: rows run along x.
        shape_args = {
            "meshScale": [TERRAIN_RESOLUTION, TERRAIN_RESOLUTION, 1.0],
            "numHeightfieldRows": len(self._x),
            "numHeightfieldColumns": len(self._y),
        }
        if self._shape is None:
            span = np.zeros_like(heights)
            span[-1, -1] = MAX_HEIGHT  # fixes the shape's height range for every later replacement
            self._shape = client.createCollisionShape(
                pybullet.GEOM_HEIGHTFIELD, heightfieldData=span.ravel().tolist(), **shape_args
            )
            self.heightfield = client.createMultiBody(0, self._shape, basePosition=[0.0, 0.0, 0.5 * MAX_HEIGHT])
        client.createCollisionShape(
            pybullet.GEOM_HEIGHTFIELD,
            heightfieldData=heights.ravel().tolist(),
            replaceHeightfieldIndex=self._shape,
            **shape_args,
        )

    def height(self, x: float, y: float) -> float:
        """Ground height (m) under the point (x, y) (heightfield: the nearest grid point)."""
        if self.params.kind == SLOPE:
            return float(x * math.tan(self.params.slope))
        if self._heights is None:
            return 0.0
        ix = int(np.clip(np.round((x - self._x[0]) / TERRAIN_RESOLUTION), 0, len(self._x) - 1))
        iy = int(np.clip(np.round((y - self._y[0]) / TERRAIN_RESOLUTION), 0, len(self._y) - 1))
        return float(self._heights[iy, ix])

    def spawn_height(self) -> float:
        """Highest ground point within SPAWN_RADIUS of the origin: the robot spawns that much higher."""
        if self.params.kind == SLOPE:
            return SPAWN_RADIUS * abs(math.tan(self.params.slope))
        if self._heights is None:
            return 0.0
        near = (self._x[None, :] ** 2 + self._y[:, None] ** 2) <= SPAWN_RADIUS**2
        return float(self._heights[near].max())
