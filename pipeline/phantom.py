"""Phantom blind sweeps: synthetic ACOUSLIC-AI-style cases with exact ground truth.

No real blind-sweep data can be downloaded here, so the pipeline is tested on a phantom whose truth is known
exactly: a 3-D fetus (trunk ellipsoid with stomach bubble, umbilical vein and spine; head beyond) is cut by a
moving, jittering convex probe plane and rendered as B-mode (Rayleigh speckle over an echogenicity map, depth
attenuation, bone shadows, log compression), scan-converted into ACOUSLIC's 562 x 744 sector at 0.28 mm.

Every structure is a quadric, so on a probe plane with in-plane coordinates (x lateral, y along the centre
beam from the apex, mm) each one is a 2-D quadratic ``q(x, y) = a x^2 + b xy + c y^2 + d x + e y + f`` whose
six coefficients cost a few 3-vector products per frame; rendering is then a handful of fused array
operations on a fixed polar grid, and the abdomen mask is the same quadratic on the Cartesian pixel grid.

Labels follow ACOUSLIC (0 background, 1 optimal, 2 suboptimal), defined on the geometry:

* optimal: the plane normal is within ``OPTIMAL_ANGLE_DEG`` of the spine axis (the standard AC plane is
  perpendicular to the spine), the plane passes within ``OPTIMAL_DISTANCE_MM`` of the standard-plane centre
  (the trunk axis point at the level of the stomach bubble and umbilical vein), and the whole trunk
  cross-section lies inside the sector;
* suboptimal: not optimal, the normal within ``SUBOPTIMAL_ANGLE_DEG`` of the spine axis, and at least
  ``MIN_MASK_PIXELS`` abdomen pixels (trunk within ``ABDOMEN_HALF_LENGTH`` of the standard level) in view.

A labelled frame's mask marks its abdomen cross-section pixels with the label. A sweep's reference AC is the
exact perimeter of the trunk's cross-section at the standard plane when the sweep has an optimal frame.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.special import ellipe

HEIGHT, WIDTH = 562, 744
PIXEL_MM = 0.28
SWEEPS = 6
FRAMES_PER_SWEEP = 140
SPACING = (PIXEL_MM, PIXEL_MM, 1.0)  # SimpleITK order (x, y, frame)

HALF_ANGLE = np.deg2rad(30.0)
R_MIN = 40.0  # mm from the virtual apex to the transducer face
APEX_MM = R_MIN * np.cos(HALF_ANGLE)  # apex height above the top row: the whole near arc is in the image
R_MAX = (HEIGHT - 1) * PIXEL_MM + APEX_MM  # the far arc touches the bottom row at the centre
N_R, N_PHI = 320, 168  # polar samples: 0.48 mm axially, 0.35 degree beams (widening with depth, as real ones)
SPECKLE_SIGMA = (0.8, 1.2)  # Gaussian point-spread of the IQ noise in beams and axial samples

OPTIMAL_ANGLE_DEG = 10.0
OPTIMAL_DISTANCE_MM = 2.0
SUBOPTIMAL_ANGLE_DEG = 40.0
ABDOMEN_HALF_LENGTH = 0.35  # of the trunk's half-length, either side of the standard level
MIN_MASK_PIXELS = 500

SWEEP_HALF_TRAVEL_MM = 110.0
SWEEP_OFFSETS_MM = (-35.0, 0.0, 35.0)
DYNAMIC_RANGE_DB = 40.0
ATTENUATION_DB_PER_MM = 0.05  # net of time-gain compensation

# Echogenicity (amplitude, 1 = bone).
ECHO = {"maternal": 0.22, "fluid": 0.008, "trunk": 0.16, "skin": 0.45, "stomach": 0.006, "vein": 0.01,
        "spine": 1.0, "spine_gap": 0.3, "brain": 0.07, "skull": 1.0, "falx": 0.5}


def ellipse_perimeter(a: float, b: float) -> float:
    """Exact perimeter of an ellipse with semi-axes a, b: 4 A E(1 - B^2/A^2), A the larger."""
    big, small = max(a, b), min(a, b)
    return float(4.0 * big * ellipe(1.0 - (small / big) ** 2))


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation matrix about a unit axis."""
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)


@dataclass(frozen=True)
class Quadric:
    """``(p - center)^T Q (p - center) <= 1`` in fetal coordinates (a cylinder has a zero eigenvalue)."""

    center: np.ndarray
    q: np.ndarray

    @staticmethod
    def ellipsoid(center: tuple[float, float, float], semi: tuple[float, float, float],
                  rotation: np.ndarray | None = None) -> Quadric:
        r = np.eye(3) if rotation is None else rotation
        return Quadric(np.asarray(center, float), r @ np.diag(1.0 / np.square(semi)) @ r.T)

    def coefficients(self, w: np.ndarray, e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
        """Coefficients (x^2, xy, y^2, x, y, 1) of q on the plane p(x, y) = w + x e1 + y e2."""
        v = w - self.center
        qe1, qe2, qv = self.q @ e1, self.q @ e2, self.q @ v
        return np.array([e1 @ qe1, 2 * e1 @ qe2, e2 @ qe2, 2 * e1 @ qv, 2 * e2 @ qv, v @ qv])


@dataclass(frozen=True, eq=False)
class Fetus:
    """Fetal anatomy in fetal coordinates (x lateral, y anterior, z along the spine towards the head) and
    its pose in the mother (``rotation`` columns are the fetal axes in world coordinates, ``position`` the
    trunk centre; world x maternal left-right, y caudo-cranial, z depth below the skin)."""

    semi_axes: tuple[float, float, float]  # trunk (a lateral, b antero-posterior, c half-length), mm
    standard_z: float  # level of the standard AC plane (stomach bubble, umbilical vein), fetal z, mm
    rotation: np.ndarray
    position: np.ndarray

    @property
    def section_semi_axes(self) -> tuple[float, float]:
        """Semi-axes of the trunk's cross-section at the standard plane."""
        a, b, c = self.semi_axes
        s = np.sqrt(1.0 - (self.standard_z / c) ** 2)
        return a * s, b * s

    @property
    def ac_mm(self) -> float:
        return ellipse_perimeter(*self.section_semi_axes)

    @property
    def spine_axis(self) -> np.ndarray:
        return self.rotation[:, 2]

    @property
    def standard_center(self) -> np.ndarray:
        """World position of the standard-plane centre (the trunk axis at the standard level)."""
        return self.position + self.rotation[:, 2] * self.standard_z


@dataclass(frozen=True, eq=False)
class Sweep:
    """Probe poses for every frame: apex position, lateral and centre-beam unit vectors (world, mm)."""

    apex: np.ndarray  # (F, 3)
    lateral: np.ndarray  # (F, 3)
    beam: np.ndarray  # (F, 3)


@dataclass(frozen=True, eq=False)
class Case:
    uid: str
    subject_id: int
    render_seed: int
    fetus: Fetus
    sweeps: tuple[Sweep, ...]

    @property
    def frames_per_sweep(self) -> int:
        return len(self.sweeps[0].apex)


@dataclass(frozen=True, eq=False)
class CaseData:
    """One rendered case: the stacks as ACOUSLIC stores them (frames of all sweeps in order)."""

    case: Case
    images: np.ndarray  # (SWEEPS * F, HEIGHT, WIDTH) uint8
    masks: np.ndarray  # same shape, 0 / 1 / 2
    labels: np.ndarray  # (SWEEPS * F,) frame labels
    sweep_ac_mm: tuple[float | None, ...]  # reference AC per sweep, None without an optimal frame


def _smooth_noise(rng: np.random.Generator, t: np.ndarray, amplitude: float) -> np.ndarray:
    """Slow hand tremor: three random sinusoids (a fixed number of draws, whatever the frame count)."""
    freqs, phases, weights = rng.uniform(0.5, 4.0, 3), rng.uniform(0, 2 * np.pi, 3), rng.normal(0, 1, 3)
    wave = (weights[:, None] * np.sin(2 * np.pi * freqs[:, None] * t[None] + phases[:, None])).sum(0)
    return amplitude * wave / np.sqrt(np.square(weights).sum())


def _make_fetus(rng: np.random.Generator) -> Fetus:
    """Gestational ages spread the AC over about 150-350 mm; lie and rotation vary as in real sweeps."""
    ac_target = rng.uniform(155.0, 345.0)
    ratio = rng.uniform(0.8, 0.95)  # antero-posterior / lateral
    z_frac = rng.uniform(0.05, 0.2)  # standard level, as a fraction of the half-length
    unit_perimeter = ellipse_perimeter(1.0, ratio) * np.sqrt(1.0 - z_frac**2)
    a = ac_target / unit_perimeter
    c = rng.uniform(1.5, 1.8) * a
    world = np.eye(3)
    lie = world[:, 1] if rng.random() < 0.75 else world[:, 0]  # longitudinal lie, else transverse
    lie = lie * rng.choice([-1.0, 1.0])  # cephalic or breech
    tilt = min(abs(rng.normal(0.0, 8.0)), 30.0)
    tilt_axis = np.cross(lie, _rotation(lie, rng.uniform(0, 2 * np.pi)) @ np.cross(lie, world[:, 2]))
    spine = _rotation(tilt_axis / np.linalg.norm(tilt_axis), np.deg2rad(tilt)) @ lie
    x0 = np.cross(world[:, 2], spine)
    x0 /= np.linalg.norm(x0)
    fx = _rotation(spine, rng.uniform(0, 2 * np.pi)) @ x0  # rotation of the fetus about its spine
    rotation = np.stack([fx, np.cross(spine, fx), spine], axis=1)
    position = np.array([rng.uniform(-20, 20), rng.uniform(-15, 15), rng.uniform(25, 40) + a])
    return Fetus((a, ratio * a, c), z_frac * c, rotation, position)


def _make_sweep(rng: np.random.Generator, index: int, frames: int) -> Sweep:
    """Sweeps 1-3 transverse (plane normal caudo-cranial) at three lateral offsets, 4-6 sagittal; each with a
    static misalignment, tremor in tilt, rock and lateral position, and an uneven speed."""
    world = np.eye(3)
    if index < 3:
        lateral, travel = world[:, 0], world[:, 1]
    else:
        lateral, travel = world[:, 1], world[:, 0]
    offset = SWEEP_OFFSETS_MM[index % 3] + rng.normal(0, 5)
    t = np.linspace(0.0, 1.0, frames)
    tilt = np.deg2rad(rng.normal(0, 3) + _smooth_noise(rng, t, 2.0))
    rock = np.deg2rad(rng.normal(0, 3) + _smooth_noise(rng, t, 2.0))
    shift = _smooth_noise(rng, t, 1.5)
    speed = 1.0 + 0.3 * _smooth_noise(rng, t, 1.0)
    progress = np.concatenate([[0.0], np.cumsum(speed[1:])])
    progress = progress / progress[-1] if frames > 1 else progress
    direction = rng.choice([-1.0, 1.0])
    along = direction * SWEEP_HALF_TRAVEL_MM * (2 * progress - 1)
    apex, lat, beam = np.empty((frames, 3)), np.empty((frames, 3)), np.empty((frames, 3))
    for i in range(frames):
        r = _rotation(world[:, 2], rock[i]) @ _rotation(lateral, tilt[i])
        lat[i], beam[i] = r @ lateral, r @ world[:, 2]
        skin = lateral * (offset + shift[i]) + travel * along[i]
        apex[i] = skin - R_MIN * beam[i]
    return Sweep(apex, lat, beam)


def make_cases(seed: int, count: int, frames_per_sweep: int = FRAMES_PER_SWEEP) -> list[Case]:
    """``count`` cases, deterministic per seed (and independent of how many are asked for after them)."""
    root = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        rng = np.random.default_rng(root.integers(0, 2**63))
        uid = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        fetus = _make_fetus(rng)
        sweeps = tuple(_make_sweep(rng, k, frames_per_sweep) for k in range(SWEEPS))
        cases.append(Case(uid, i, int(rng.integers(0, 2**63)), fetus, sweeps))
    return cases


def _polar_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.linspace(R_MIN, R_MAX, N_R)
    phi = np.linspace(-HALF_ANGLE, HALF_ANGLE, N_PHI)
    rr, pp = np.meshgrid(r, phi, indexing="ij")
    return (rr * np.sin(pp)).astype(np.float32), (rr * np.cos(pp)).astype(np.float32), r


def _scan_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2.remap maps from the Cartesian frame into the polar grid, and the sector's pixel mask."""
    x = (np.arange(WIDTH) - (WIDTH - 1) / 2) * PIXEL_MM
    y = np.arange(HEIGHT) * PIXEL_MM + APEX_MM
    xx, yy = np.meshgrid(x, y)
    r, phi = np.hypot(xx, yy), np.arctan2(xx, yy)
    sector = (r >= R_MIN) & (r <= R_MAX) & (np.abs(phi) <= HALF_ANGLE)
    map_r = np.where(sector, (r - R_MIN) / (R_MAX - R_MIN) * (N_R - 1), -1).astype(np.float32)
    map_phi = np.where(sector, (phi + HALF_ANGLE) / (2 * HALF_ANGLE) * (N_PHI - 1), -1).astype(np.float32)
    return map_phi, map_r, sector


class Renderer:
    """Renders frames and ground truth of one case; the grids are built once and shared by all frames."""

    _grids: tuple | None = None

    def __init__(self, case: Case) -> None:
        if Renderer._grids is None:
            Renderer._grids = (_polar_grid(), _scan_maps())
        (self.px, self.py, r), (self.map_x, self.map_y, self.sector) = Renderer._grids
        self.pxx, self.pxy, self.pyy = self.px * self.px, self.px * self.py, self.py * self.py
        self.attenuation = (10.0 ** (-ATTENUATION_DB_PER_MM * (r - R_MIN) / 20.0)).astype(np.float32)[:, None]
        kx, ky = (cv2.getGaussianKernel(n, sigma) for n, sigma in zip((3, 5), SPECKLE_SIGMA, strict=True))
        # Blurred IQ back to unit variance, so echogenicity alone sets the mean brightness.
        self.speckle_gain = np.float32(1.0 / np.sqrt(np.square(kx).sum() * np.square(ky).sum()))
        self.cx = ((np.arange(WIDTH) - (WIDTH - 1) / 2) * PIXEL_MM).astype(np.float32)
        self.cy = (np.arange(HEIGHT) * PIXEL_MM + APEX_MM).astype(np.float32)
        self.case = case
        f = case.fetus
        a, b, c = f.semi_axes
        zs = f.standard_z
        self.trunk = Quadric.ellipsoid((0, 0, 0), (a, b, c))
        self.skin = Quadric.ellipsoid((0, 0, 0), (a + 1.5, b + 1.5, c + 1.5))
        self.stomach = Quadric.ellipsoid((-0.35 * a, 0.05 * b, zs + 0.1 * a), (0.25 * a, 0.2 * b, 0.3 * a))
        vein_dir = _rotation(np.array([0.0, 0.0, 1.0]), np.deg2rad(20.0))
        self.vein = Quadric.ellipsoid((0.08 * a, 0.45 * b, zs), (0.06 * b, 0.32 * b, 0.06 * b), vein_dir)
        spine_r = 0.14 * b
        self.spine = Quadric(np.array([0.0, -0.75 * b, 0.0]), np.diag([1 / spine_r**2, 1 / spine_r**2, 0.0]))
        self.vertebra_mm = max(0.07 * c, 3.0)
        head = (0.95 * a, 1.15 * a, 1.05 * a)
        self.head_z = c + 0.85 * head[2]
        self.skull = Quadric.ellipsoid((0, 0, self.head_z), head)
        self.brain = Quadric.ellipsoid((0, 0, self.head_z), tuple(s - 2.5 for s in head))
        # Axis-aligned in world coordinates, its top a few mm below the skin.
        self.uterus = Quadric.ellipsoid((f.position[0], f.position[1], f.position[2] + 10.0),
                                        (120.0, 150.0, f.position[2] + 2.0))

    def _plane(self, sweep: int, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The frame's plane in fetal coordinates (origin, lateral, beam) and its world normal."""
        s, f = self.case.sweeps[sweep], self.case.fetus
        rt = f.rotation.T
        w = rt @ (s.apex[frame] - f.position)
        return w, rt @ s.lateral[frame], rt @ s.beam[frame], np.cross(s.lateral[frame], s.beam[frame])

    def _polar_q(self, k: np.ndarray) -> np.ndarray:
        return (k[0] * self.pxx + k[1] * self.pxy + k[2] * self.pyy + k[3] * self.px + k[4] * self.py
                + k[5]).astype(np.float32, copy=False)

    def echogenicity(self, sweep: int, frame: int) -> np.ndarray:
        """The (N_R, N_PHI) echogenicity map of the frame's plane, painted back to front."""
        s = self.case.sweeps[sweep]
        w, e1, e2, _ = self._plane(sweep, frame)
        fz = w[2] + self.px * e1[2] + self.py * e2[2]  # fetal z at each sample
        fx = w[0] + self.px * e1[0] + self.py * e2[0]
        echo = np.full(self.px.shape, ECHO["maternal"], np.float32)
        uterus = self.uterus.coefficients(s.apex[frame], s.lateral[frame], s.beam[frame])
        echo[self._polar_q(uterus) <= 1] = ECHO["fluid"]
        skull = self._polar_q(self.skull.coefficients(w, e1, e2))
        echo[skull <= 1] = ECHO["skull"]
        brain = self._polar_q(self.brain.coefficients(w, e1, e2)) <= 1
        echo[brain] = ECHO["brain"]
        echo[brain & (np.abs(fx) < 0.8)] = ECHO["falx"]
        echo[self._polar_q(self.skin.coefficients(w, e1, e2)) <= 1] = ECHO["skin"]
        trunk = self._polar_q(self.trunk.coefficients(w, e1, e2)) <= 1
        echo[trunk] = ECHO["trunk"]
        echo[self._polar_q(self.stomach.coefficients(w, e1, e2)) <= 1] = ECHO["stomach"]
        echo[self._polar_q(self.vein.coefficients(w, e1, e2)) <= 1] = ECHO["vein"]
        spine = trunk & (self._polar_q(self.spine.coefficients(w, e1, e2)) <= 1)
        bone = np.cos(2 * np.pi * fz / self.vertebra_mm) > -0.3
        echo[spine] = np.where(bone[spine], ECHO["spine"], ECHO["spine_gap"])
        return echo

    def render(self, sweep: int, frame: int) -> np.ndarray:
        """B-mode frame: speckle, attenuation, shadowing behind bone, log compression, scan conversion."""
        echo = self.echogenicity(sweep, frame)
        rng = np.random.default_rng([self.case.render_seed, sweep, frame])
        iq = rng.standard_normal((2, N_R, N_PHI), dtype=np.float32)
        i, q = (cv2.GaussianBlur(part, (3, 5), *SPECKLE_SIGMA) for part in iq)
        speckle = np.sqrt(i * i + q * q) * self.speckle_gain
        shadow = np.exp(-0.08 * np.cumsum(echo >= 0.9, axis=0, dtype=np.float32))
        envelope = echo * speckle * self.attenuation * shadow + 1e-4
        db = 20.0 * np.log10(envelope / 2.5)
        polar = np.clip((db + DYNAMIC_RANGE_DB) * (255.0 / DYNAMIC_RANGE_DB), 0, 255).astype(np.uint8)
        return cv2.remap(polar, self.map_x, self.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)

    def truth(self, sweep: int, frame: int) -> dict:
        """Frame label, labelled abdomen mask and the geometry the label was decided on."""
        f = self.case.fetus
        w, e1, e2, normal = self._plane(sweep, frame)
        apex = self.case.sweeps[sweep].apex[frame]
        angle = float(np.degrees(np.arccos(min(1.0, abs(normal @ f.spine_axis)))))
        distance = float(abs(normal @ (f.standard_center - apex)))
        k = self.trunk.coefficients(w, e1, e2)
        quad = np.array([[k[0], k[1] / 2], [k[1] / 2, k[2]]])
        lin = np.array([k[3], k[4]]) / 2
        center = -np.linalg.solve(quad, lin)
        level = 1.0 - (k[5] + lin @ center)  # the section is (p - center)^T quad (p - center) <= level
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        section, inside = None, False
        if level > 0:
            evals, evecs = np.linalg.eigh(quad / level)
            semi = 1.0 / np.sqrt(evals)
            section = (float(semi[0]), float(semi[1]))
            t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
            rim = center[:, None] + evecs @ (semi[:, None] * np.stack([np.cos(t), np.sin(t)]))
            r, phi = np.hypot(rim[0], rim[1]), np.arctan2(rim[0], rim[1])
            inside = bool(np.all((r >= R_MIN) & (r <= R_MAX) & (np.abs(phi) <= HALF_ANGLE)))
            self._abdomen_pixels(mask, k, center, np.linalg.inv(quad) * level, w, e1, e2)
        optimal = angle <= OPTIMAL_ANGLE_DEG and distance <= OPTIMAL_DISTANCE_MM and inside
        if optimal:
            label = 1
        elif angle <= SUBOPTIMAL_ANGLE_DEG and np.count_nonzero(mask) >= MIN_MASK_PIXELS:
            label = 2
        else:
            label = 0
        mask *= label
        return {"label": label, "mask": mask, "angle_deg": angle, "distance_mm": distance,
                "section_semi_axes_mm": section, "section_inside": inside, "ac_mm": f.ac_mm}

    def _abdomen_pixels(self, mask: np.ndarray, k: np.ndarray, center: np.ndarray, extent: np.ndarray,
                        w: np.ndarray, e1: np.ndarray, e2: np.ndarray) -> None:
        """Sets the sector pixels inside the trunk section and within the abdominal levels, evaluated only
        in the section's bounding box."""
        hx, hy = np.sqrt(np.diag(extent))
        c0 = max(0, int(np.floor((center[0] - hx) / PIXEL_MM + (WIDTH - 1) / 2)))
        c1 = min(WIDTH, int(np.ceil((center[0] + hx) / PIXEL_MM + (WIDTH - 1) / 2)) + 1)
        r0 = max(0, int(np.floor((center[1] - hy - APEX_MM) / PIXEL_MM)))
        r1 = min(HEIGHT, int(np.ceil((center[1] + hy - APEX_MM) / PIXEL_MM)) + 1)
        if c0 >= c1 or r0 >= r1:
            return
        x, y = self.cx[None, c0:c1], self.cy[r0:r1, None]
        q = k[0] * x * x + k[1] * x * y + k[2] * y * y + k[3] * x + k[4] * y + k[5]
        fz = w[2] + x * e1[2] + y * e2[2]
        limit = ABDOMEN_HALF_LENGTH * self.case.fetus.semi_axes[2]
        inside = (q <= 1) & (np.abs(fz - self.case.fetus.standard_z) <= limit) & self.sector[r0:r1, c0:c1]
        mask[r0:r1, c0:c1] = inside


def iter_case_frames(case: Case, start: int = 0) -> Iterator[tuple[np.ndarray, int, int, dict]]:
    """Yields (frame uint8 HEIGHT x WIDTH, sweep index, frame index, ground-truth dict) in acquisition order,
    rendering each frame on demand so a live source can stream a case; from the case's frame `start` on
    (a frame depends only on its case, sweep and index, so the earlier ones need not be rendered)."""
    renderer = Renderer(case)
    for sweep in range(SWEEPS):
        for frame in range(case.frames_per_sweep):
            if sweep * case.frames_per_sweep + frame >= start:
                yield renderer.render(sweep, frame), sweep, frame, renderer.truth(sweep, frame)


def render_case(case: Case) -> CaseData:
    """The whole case in memory: image and mask stacks, frame labels and per-sweep reference ACs."""
    n = SWEEPS * case.frames_per_sweep
    images = np.empty((n, HEIGHT, WIDTH), np.uint8)
    masks = np.empty((n, HEIGHT, WIDTH), np.uint8)
    labels = np.empty(n, np.uint8)
    for i, (image, _, _, gt) in enumerate(iter_case_frames(case)):
        images[i], masks[i], labels[i] = image, gt["mask"], gt["label"]
    per_sweep = labels.reshape(SWEEPS, case.frames_per_sweep)
    sweep_ac = tuple(case.fetus.ac_mm if (row == 1).any() else None for row in per_sweep)
    return CaseData(case, images, masks, labels, sweep_ac)
