"""Phantom blind sweeps: synthetic ACOUSLIC-AI-style cases with exact ground truth.

No real blind-sweep data can be downloaded here, so the pipeline is tested on a phantom whose truth is known
exactly. A case is a pregnant abdomen in 3-D: the maternal wall (skin, fat with septa, rectus muscle,
fascia), the uterus (myometrium, amniotic fluid with floating particles, an anterior or posterior placenta),
maternal tissue behind it, and a fetus sized by gestational age along Hadlock's growth curves (trunk with
liver, lungs, bowel, stomach, umbilical vein, kidneys, bladder, heart, ribs and a spine; a head with skull,
brain and falx; flexed arms and legs with humerus and femur; cord loops). A novice's probe sweeps it in the
six-sweep protocol (3 transverse caudocranial, 3 sagittal left to right) with uneven speed, pauses, tilt, rock
and yaw jitter, the mother's breathing, partial contact at the sector edges and brief lift-offs, and each
frame is rendered as B-mode: speckle fixed to the tissue along the sweep (neighbouring frames within the
elevational beam width share it) whose grain grows with depth, lateral blur, attenuation per tissue with
the case's time-gain compensation and gain (so bone shadows and fluid enhances), specular interfaces that
drop out where the beam runs along them, near-field reverberation and an electronic noise floor; then scan
converted into ACOUSLIC's 562 x 744 sector at 0.28 mm.

Every structure is a quadric, so on a probe plane with in-plane coordinates (x lateral, y along the centre
beam from the apex, mm) each one is a 2-D quadratic ``q(x, y) = a x^2 + b xy + c y^2 + d x + e y + f`` whose
six coefficients cost a few 3-vector products per frame; structures the plane does not reach are skipped,
and rendering is a handful of fused array operations on a fixed polar grid.

Labels follow ACOUSLIC (0 background, 1 optimal, 2 suboptimal), defined on the geometry:

* optimal: the plane normal is within ``OPTIMAL_ANGLE_DEG`` of the spine axis (the standard AC plane is
  perpendicular to the spine), the plane passes within ``OPTIMAL_DISTANCE_MM`` of the standard-plane centre
  (the trunk axis point at the level of the stomach bubble and umbilical vein), and the whole trunk
  cross-section lies inside the part of the sector the probe has contact for;
* suboptimal: not optimal, the normal within ``SUBOPTIMAL_ANGLE_DEG`` of the spine axis, and at least
  ``MIN_MASK_PIXELS`` abdomen pixels (trunk within ``ABDOMEN_HALF_LENGTH`` of the standard level) in the
  contacted sector.

A labelled frame's mask marks its abdomen cross-section pixels (in the contacted sector) with the label. A
sweep's reference AC is the exact perimeter of the trunk's cross-section at the standard plane when the sweep
has an optimal frame.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates
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
DR_MM = (R_MAX - R_MIN) / (N_R - 1)
NEAR_PSF = (0.7, 0.9)  # Gaussian point-spread of the IQ (beams, axial samples) at the face ...
FAR_PSF = (1.8, 1.6)  # ... and at the far arc: the speckle grain grows with depth

OPTIMAL_ANGLE_DEG = 10.0
OPTIMAL_DISTANCE_MM = 5.0
# The umbilical vein at the portal sinus is the landmark of the standard plane: seen over about the levels
# that count as optimal, so the label is a thing an image shows.
VEIN_HALF_LEVELS_MM = 1.2 * OPTIMAL_DISTANCE_MM
SUBOPTIMAL_ANGLE_DEG = 40.0
ABDOMEN_HALF_LENGTH = 0.35  # of the trunk's half-length, either side of the standard level
MIN_MASK_PIXELS = 500

GA_WEEKS = (20.0, 38.0)  # gestational ages drawn uniformly; sizes follow Hadlock's curves
SIZE_SPREAD = 0.05  # fetal size scatter about the curve (1 sd, truncated at 2 sd)
SWEEP_HALF_TRAVEL_MM = 65.0
SWEEP_OFFSETS_MM = (-35.0, 0.0, 35.0)
TEXTURE_VOXEL_MM, TEXTURE_SIZE, TEXTURE_STEP = 2.5, 64, 4  # texture volume (wraps every 160 mm), sampling
FLUID_ECHO = 0.03  # below this a sample counts as fluid (not textured)
SPECKLE_SLICE_MM = 1.5  # speckle decorrelates over about the elevational beam width

# Echogenicity (amplitude, 1 = bone) and texture depth (relative modulation by the tissue texture field).
ECHO = {"skin": 0.5, "fat": 0.05, "septum": 0.3, "muscle": 0.16, "fascia": 0.45, "maternal": 0.2,
        "myometrium": 0.11, "fluid": 0.006, "particle": 0.12, "placenta": 0.28, "body": 0.15, "liver": 0.13,
        "lung": 0.3, "bowel": 0.3, "stomach": 0.008, "vein": 0.012, "kidney": 0.07, "bladder": 0.006,
        "heart": 0.12, "chamber": 0.02, "rib": 0.9, "spine": 1.0, "spine_gap": 0.3, "brain": 0.05,
        "skull": 1.0, "falx": 0.45, "limb": 0.17, "bone": 0.95, "cord": 0.15, "interface": 0.6}
TEXTURE = {"maternal": 0.4, "myometrium": 0.3, "placenta": 0.4, "body": 0.3, "liver": 0.35, "lung": 0.25,
           "bowel": 0.6, "limb": 0.3, "cord": 0.3, "muscle": 0.35}
ATTENUATION_DB_PER_MM = {"tissue": 0.09, "fluid": 0.01, "bone": 5.0}  # two-way, at the probe's frequency
BONE_ECHO = 0.85  # at or above this a sample is bone (shadows)


def ellipse_perimeter(a: float, b: float) -> float:
    """Exact perimeter of an ellipse with semi-axes a, b: 4 A E(1 - B^2/A^2), A the larger."""
    big, small = max(a, b), min(a, b)
    return float(4.0 * big * ellipe(1.0 - (small / big) ** 2))


def hadlock_ac_mm(ga_weeks: float) -> float:
    """Hadlock's abdominal circumference for a gestational age: -13.3 + 1.61 GA - 0.00998 GA^2 cm."""
    return 10.0 * (-13.3 + 1.61 * ga_weeks - 0.00998 * ga_weeks**2)


def hadlock_bpd_mm(ga_weeks: float) -> float:
    """Hadlock's biparietal diameter: -3.08 + 0.41 GA - 0.000061 GA^3 cm."""
    return 10.0 * (-3.08 + 0.41 * ga_weeks - 0.000061 * ga_weeks**3)


def hadlock_fl_mm(ga_weeks: float) -> float:
    """Hadlock's femur length: -3.91 + 0.427 GA - 0.0034 GA^2 cm."""
    return 10.0 * (-3.91 + 0.427 * ga_weeks - 0.0034 * ga_weeks**2)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation matrix about a unit axis."""
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)


def _rotations(axis: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """(F, 3, 3) Rodrigues rotations about one unit axis, one per angle."""
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return (np.eye(3) + np.sin(angles)[:, None, None] * k
            + (1.0 - np.cos(angles))[:, None, None] * (k @ k))


def _along(direction: np.ndarray) -> np.ndarray:
    """A rotation whose third column is the unit vector ``direction`` (for elongated ellipsoids)."""
    d = direction / np.linalg.norm(direction)
    helper = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(d, helper)
    u /= np.linalg.norm(u)
    return np.stack([u, np.cross(d, u), d], axis=1)


@dataclass(frozen=True)
class Quadric:
    """``(p - center)^T Q (p - center) <= 1`` in fetal or world coordinates (a cylinder has a zero
    eigenvalue); ``radius`` bounds the solid around its centre (infinite for a cylinder), so a plane farther
    away skips it."""

    center: np.ndarray
    q: np.ndarray
    radius: float = np.inf

    @staticmethod
    def ellipsoid(center: tuple[float, float, float] | np.ndarray, semi: tuple[float, float, float],
                  rotation: np.ndarray | None = None) -> Quadric:
        r = np.eye(3) if rotation is None else rotation
        return Quadric(np.asarray(center, float), r @ np.diag(1.0 / np.square(semi)) @ r.T, float(max(semi)))

    def coefficients(self, w: np.ndarray, e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
        """Coefficients (x^2, xy, y^2, x, y, 1) of q on the plane p(x, y) = w + x e1 + y e2."""
        v = w - self.center
        qe1, qe2, qv = self.q @ e1, self.q @ e2, self.q @ v
        return np.array([e1 @ qe1, 2 * e1 @ qe2, e2 @ qe2, 2 * e1 @ qv, 2 * e2 @ qv, v @ qv])

    def reaches(self, w: np.ndarray, e1: np.ndarray, e2: np.ndarray, normal: np.ndarray) -> bool:
        """Whether the plane p(x, y) = w + x e1 + y e2 (unit ``normal``) can cut the solid inside the
        sector's bounding box."""
        v = self.center - w
        off = abs(normal @ v)
        if off > self.radius:
            return False
        reach = np.sqrt(self.radius**2 - off**2)
        x, y = v @ e1, v @ e2
        return bool(abs(x) - reach <= R_MAX * np.sin(HALF_ANGLE) and R_MIN * np.cos(HALF_ANGLE) - reach <= y
                    and y - reach <= R_MAX)


@dataclass(frozen=True, eq=False)
class Fetus:
    """Fetal anatomy in fetal coordinates (x lateral, y anterior, z along the spine towards the head) and
    its pose in the mother (``rotation`` columns are the fetal axes in world coordinates, ``position`` the
    trunk centre; world x maternal left-right, y caudo-cranial, z depth below the skin)."""

    semi_axes: tuple[float, float, float]  # trunk (a lateral, b antero-posterior, c half-length), mm
    standard_z: float  # level of the standard AC plane (stomach bubble, umbilical vein), fetal z, mm
    rotation: np.ndarray
    position: np.ndarray
    ga_weeks: float
    head_semi_axes: tuple[float, float, float]  # lateral (BPD / 2), antero-posterior, along the spine
    femur_mm: float

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
class Mother:
    """The maternal abdomen in world coordinates: wall layers (depths below the skin, mm), the uterine
    cavity (an ellipsoid, its wall a shell around it) and the placenta on the cavity's anterior or posterior
    wall."""

    fat_mm: float
    muscle_mm: float
    uterus_center: np.ndarray
    uterus_semi: tuple[float, float, float]  # along the fetal lie, across it, in depth
    uterus_axes: np.ndarray  # columns: the cavity's axes in world coordinates
    myometrium_mm: float
    placenta_center: np.ndarray
    placenta_semi: tuple[float, float, float]
    placenta_anterior: bool


@dataclass(frozen=True, eq=False)
class Imaging:
    """One case's machine settings and body habitus: tissue attenuation, how much of it the time-gain
    compensation takes back, overall gain, display dynamic range, electronic noise and near-field
    reverberation."""

    attenuation_scale: float  # the case's tissue attenuation relative to ATTENUATION_DB_PER_MM
    tgc_db_per_mm: float  # time-gain compensation slope
    tgc_knots_db: tuple[float, float, float]  # extra TGC at the near, middle and far field (slider bumps)
    gain_db: float
    dynamic_range_db: float
    noise_floor: float  # electronic noise amplitude, before TGC
    reverberation: float  # near-field reverberation strength


@dataclass(frozen=True, eq=False)
class Sweep:
    """Probe poses for every frame: apex position, lateral and centre-beam unit vectors (world, mm), and the
    angular span (radians, from the left edge to the right) of the face in contact with the skin: the full
    sector in good contact, a narrower one where an edge lifts, an empty one (lo >= hi) in a lift-off."""

    apex: np.ndarray  # (F, 3)
    lateral: np.ndarray  # (F, 3)
    beam: np.ndarray  # (F, 3)
    contact: np.ndarray  # (F, 2)
    elevation: np.ndarray  # (F,) mm along the travel: where the frame's speckle comes from


@dataclass(frozen=True, eq=False)
class Case:
    uid: str
    subject_id: int
    render_seed: int
    fetus: Fetus
    sweeps: tuple[Sweep, ...]
    mother: Mother
    imaging: Imaging

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


def _smooth_noise(rng: np.random.Generator, t: np.ndarray, amplitude: float, fast: float = 4.0) -> np.ndarray:
    """Slow hand tremor: three random sinusoids (a fixed number of draws, whatever the frame count)."""
    freqs, phases, weights = rng.uniform(0.5, fast, 3), rng.uniform(0, 2 * np.pi, 3), rng.normal(0, 1, 3)
    wave = (weights[:, None] * np.sin(2 * np.pi * freqs[:, None] * t[None] + phases[:, None])).sum(0)
    return amplitude * wave / np.sqrt(np.square(weights).sum())


def _make_fetus(rng: np.random.Generator) -> Fetus:
    """A gestational age over the ACOUSLIC range, sizes from Hadlock's curves with a shared scatter; lie
    (mostly longitudinal), presentation and rotation about the spine vary as in real sweeps."""
    ga = rng.uniform(*GA_WEEKS)
    size = 1.0 + SIZE_SPREAD * float(np.clip(rng.normal(), -2.0, 2.0))
    ac_target = float(np.clip(hadlock_ac_mm(ga) * size, 150.0, 350.0))
    ratio = rng.uniform(0.8, 0.95)  # antero-posterior / lateral
    z_frac = rng.uniform(0.05, 0.2)  # standard level, as a fraction of the half-length
    unit_perimeter = ellipse_perimeter(1.0, ratio) * np.sqrt(1.0 - z_frac**2)
    a = ac_target / unit_perimeter
    c = rng.uniform(1.5, 1.8) * a
    bpd = hadlock_bpd_mm(ga) * size
    head = (bpd / 2, bpd / 2 * rng.uniform(1.15, 1.3), bpd / 2 * rng.uniform(1.2, 1.35))
    world = np.eye(3)
    lie = world[:, 1] if rng.random() < 0.8 else world[:, 0]  # longitudinal lie, else transverse
    lie = lie * rng.choice([-1.0, 1.0])  # cephalic or breech
    tilt = min(abs(rng.normal(0.0, 6.0)), 35.0)
    tilt_axis = np.cross(lie, _rotation(lie, rng.uniform(0, 2 * np.pi)) @ np.cross(lie, world[:, 2]))
    spine = _rotation(tilt_axis / np.linalg.norm(tilt_axis), np.deg2rad(tilt)) @ lie
    x0 = np.cross(world[:, 2], spine)
    x0 /= np.linalg.norm(x0)
    fx = _rotation(spine, rng.uniform(0, 2 * np.pi)) @ x0  # rotation of the fetus about its spine
    rotation = np.stack([fx, np.cross(spine, fx), spine], axis=1)
    position = np.array([rng.uniform(-20, 20), rng.uniform(-15, 15), 0.0])
    return Fetus((a, ratio * a, c), z_frac * c, rotation, position, ga, head, hadlock_fl_mm(ga) * size)


def _make_mother(rng: np.random.Generator, fetus: Fetus) -> tuple[Mother, Fetus]:
    """Wall layers, uterus and placenta around the fetus; the fetus is placed below the wall (and an
    anterior placenta) with a little fluid around it, so the uterus is mostly fetus late in pregnancy."""
    fat, muscle = rng.uniform(3.0, 15.0), rng.uniform(4.0, 9.0)
    myometrium = rng.uniform(5.0, 9.0)
    anterior = bool(rng.random() < 0.5)
    placenta_mm = rng.uniform(18.0, 35.0)
    a, b, c = fetus.semi_axes
    extent = max(a, b)
    cavity_top = 2.0 + fat + muscle + 1.0 + myometrium
    fetus_depth = cavity_top + (placenta_mm if anterior else 0.0) + rng.uniform(3.0, 15.0) + extent
    cavity_bottom = fetus_depth + extent + rng.uniform(5.0, 20.0) + (0.0 if anterior else placenta_mm)
    position = fetus.position + np.array([0.0, 0.0, fetus_depth])
    fetus = Fetus(fetus.semi_axes, fetus.standard_z, fetus.rotation, position, fetus.ga_weeks,
                  fetus.head_semi_axes, fetus.femur_mm)
    semi_z = (cavity_bottom - cavity_top) / 2
    # The cavity's long axis follows the fetal lie; it holds the trunk, the head and the flexed legs.
    spine = fetus.rotation[:, 2]
    lie = np.array([spine[0], spine[1], 0.0]) / np.hypot(spine[0], spine[1])
    axes = np.stack([lie, np.array([-lie[1], lie[0], 0.0]), np.array([0.0, 0.0, 1.0])], axis=1)
    low, high = -c - 15.0, c + 1.6 * fetus.head_semi_axes[2]  # the fetus along its spine
    middle = fetus.position + spine * (low + high) / 2
    semi = ((high - low) / 2 + rng.uniform(15.0, 35.0),
            max(a, fetus.head_semi_axes[0]) + rng.uniform(10.0, 30.0), semi_z)
    center = np.array([middle[0], middle[1], cavity_top + semi_z])
    wall_z = cavity_top if anterior else cavity_bottom
    shift = np.array([rng.uniform(-0.4, 0.4) * semi[0], rng.uniform(-0.4, 0.4) * semi[1], 0.0])
    p_center = center + axes @ shift
    p_center[2] = wall_z
    r_placenta = rng.uniform(60.0, 90.0)
    mother = Mother(fat, muscle, center, semi, axes, myometrium, p_center,
                    (r_placenta, r_placenta, placenta_mm), anterior)
    return mother, fetus


def _make_imaging(rng: np.random.Generator) -> Imaging:
    scale = rng.uniform(0.8, 1.3)
    return Imaging(scale, ATTENUATION_DB_PER_MM["tissue"] * rng.uniform(0.55, 0.95),
                   tuple(rng.normal(0.0, 2.0, 3)), rng.normal(0.0, 2.5), rng.uniform(42.0, 55.0),
                   10.0 ** (rng.uniform(-3.3, -2.8)), rng.uniform(0.02, 0.08))


def _speed_profile(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A novice's uneven speed: a wandering pace with one or two hesitations where the probe nearly stops."""
    speed = 1.0 + 0.45 * _smooth_noise(rng, t, 1.0, fast=2.5)
    for _ in range(2):
        at, width = rng.uniform(0.1, 0.9), rng.uniform(0.03, 0.1)
        depth, keep = rng.uniform(0.6, 0.9), rng.random()
        speed = speed * (1.0 - (keep < 0.6) * depth * np.exp(-0.5 * ((t - at) / width) ** 2))
    return np.maximum(speed, 0.08)


def _contact(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Per frame, the contacted span of the face: full most of the time, an edge lifting for a stretch
    (partial contact at the sector's side), and now and then a lift-off of a few frames."""
    span = np.tile([-HALF_ANGLE, HALF_ANGLE], (frames, 1))
    if rng.random() < 0.5:
        length = int(rng.integers(8, 40))
        start = int(rng.integers(0, max(1, frames - length)))
        side = int(rng.integers(0, 2))
        lost = rng.uniform(0.15, 0.45) * 2 * HALF_ANGLE * np.sin(np.linspace(0, np.pi, length))
        end = min(frames, start + length)
        span[start:end, side] += (1 if side == 0 else -1) * lost[: end - start]
    if rng.random() < 0.3:
        length = int(rng.integers(2, 7))
        start = int(rng.integers(0, max(1, frames - length)))
        span[start : start + length] = (0.0, 0.0)
    return span


def _make_sweep(rng: np.random.Generator, index: int, frames: int) -> Sweep:
    """Sweeps 1-3 transverse (plane normal caudo-cranial, moving caudocranially) at three lateral offsets,
    4-6 sagittal (moving left to right) at three levels; each with a static misalignment, jitter in tilt,
    rock and yaw, a drifting line, an uneven speed, the mother's breathing and contact changes."""
    world = np.eye(3)
    if index < 3:
        lateral, travel = world[:, 0], world[:, 1]
    else:
        lateral, travel = world[:, 1], world[:, 0]
    offset = SWEEP_OFFSETS_MM[index % 3] + rng.normal(0, 6)
    t = np.linspace(0.0, 1.0, frames)
    tilt = np.deg2rad(rng.normal(0, 4) + _smooth_noise(rng, t, 2.0))
    rock = np.deg2rad(rng.normal(0, 4) + _smooth_noise(rng, t, 2.0))
    yaw = np.deg2rad(rng.normal(0, 4) + _smooth_noise(rng, t, 2.0))
    shift = _smooth_noise(rng, t, 3.0)
    progress = np.concatenate([[0.0], np.cumsum(_speed_profile(rng, t)[1:])])
    progress = progress / progress[-1] if frames > 1 else progress
    half_travel = SWEEP_HALF_TRAVEL_MM * rng.uniform(0.85, 1.15)
    along = half_travel * (2 * progress - 1) + rng.normal(0, 10)
    # Breathing moves the abdomen under the probe: along the sweep and in depth, about a cycle per sweep.
    cycles, phase = rng.uniform(0.6, 1.6), rng.uniform(0, 2 * np.pi)
    breath = np.sin(2 * np.pi * cycles * t + phase)
    along = along + rng.uniform(1.5, 4.0) * breath
    depth = rng.uniform(0.5, 2.0) * breath
    r = _rotations(world[:, 2], rock) @ _rotations(lateral, tilt) @ _rotations(world[:, 2], yaw)
    lat, beam = r @ lateral, r @ world[:, 2]
    skin = (lateral * (offset + shift)[:, None] + travel * along[:, None] + world[:, 2] * depth[:, None])
    return Sweep(skin - R_MIN * beam, lat, beam, _contact(rng, frames), along)


def make_cases(seed: int, count: int, frames_per_sweep: int = FRAMES_PER_SWEEP) -> list[Case]:
    """``count`` cases, deterministic per seed (and independent of how many are asked for after them)."""
    root = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        rng = np.random.default_rng(root.integers(0, 2**63))
        uid = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        mother, fetus = _make_mother(rng, _make_fetus(rng))
        imaging = _make_imaging(rng)
        sweeps = tuple(_make_sweep(rng, k, frames_per_sweep) for k in range(SWEEPS))
        cases.append(Case(uid, i, int(rng.integers(0, 2**63)), fetus, sweeps, mother, imaging))
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


def sector_mask() -> np.ndarray:
    """The scan-converted sector's pixels (bool HEIGHT x WIDTH), the same for every case."""
    return _scan_maps()[2]


def _grids() -> tuple:
    """Everything per sample and per pixel that does not depend on the case: polar sample positions, the
    quadratic basis, beam directions, scan-conversion maps, sector mask, pixel coordinates and angles."""
    px, py, r = _polar_grid()
    basis = np.stack([px * px, px * py, py * py, px, py, np.ones_like(px)]).reshape(6, -1)
    radius = np.hypot(px, py)
    map_x, map_y, sector = _scan_maps()
    cx = ((np.arange(WIDTH) - (WIDTH - 1) / 2) * PIXEL_MM).astype(np.float32)
    cy = (np.arange(HEIGHT) * PIXEL_MM + APEX_MM).astype(np.float32)
    return (px, py, r, basis, px / radius, py / radius, map_x, map_y, sector, cx, cy,
            np.arctan2(cx[None], cy[:, None]))


def _kernel(sigma: float, size: int) -> np.ndarray:
    return cv2.getGaussianKernel(size, sigma)[:, 0]


def _speckle_gain(depth: np.ndarray) -> np.ndarray:
    """Per row, the gain that brings the depth-weighted mix of near and far blurred IQ back to unit
    variance (exact: the kernels' inner products), so echogenicity alone sets the mean brightness."""
    size = (7, 7)
    near = [_kernel(s, n) for s, n in zip(NEAR_PSF, size, strict=True)]
    far = [_kernel(s, n) for s, n in zip(FAR_PSF, size, strict=True)]
    nn = np.prod([k @ k for k in near])
    ff = np.prod([k @ k for k in far])
    nf = np.prod([a @ b for a, b in zip(near, far, strict=True)])
    var = (1 - depth) ** 2 * nn + depth**2 * ff + 2 * depth * (1 - depth) * nf
    return (1.0 / np.sqrt(var)).astype(np.float32)


def _texture_volume(seed: int) -> np.ndarray:
    """A periodic smooth random volume of unit variance (features of about 5 mm): tissue heterogeneity."""
    rng = np.random.default_rng([seed, 2**31])
    volume = gaussian_filter(rng.standard_normal((TEXTURE_SIZE,) * 3), 1.0, mode="wrap")
    return (volume / volume.std()).astype(np.float32)


class Renderer:
    """Renders frames and ground truth of one case; the grids are built once and shared by all frames."""

    _grids: tuple | None = None

    def __init__(self, case: Case) -> None:
        if Renderer._grids is None:
            Renderer._grids = _grids()
        (self.px, self.py, r, self.basis, self.ux, self.uy, self.map_x, self.map_y, self.sector, self.cx,
         self.cy, self.pixel_phi) = Renderer._grids
        self.phi = np.linspace(-HALF_ANGLE, HALF_ANGLE, N_PHI)
        self.case = case
        depth = (r - R_MIN) / (R_MAX - R_MIN)
        self.depth_weight = depth.astype(np.float32)[:, None]
        self.speckle_gain = _speckle_gain(depth)[:, None]
        im = case.imaging
        knots = np.interp(depth, [0.0, 0.5, 1.0], im.tgc_knots_db)
        tgc_db = im.tgc_db_per_mm * (r - R_MIN) + knots + im.gain_db
        self.tgc = (10.0 ** (tgc_db / 20.0)).astype(np.float32)[:, None]
        scale = {"tissue": im.attenuation_scale}
        self.attenuation = {name: np.float32(value * DR_MM * scale.get(name, 1.0))
                            for name, value in ATTENUATION_DB_PER_MM.items()}
        self._build_wall(case)
        self._build_fetus(case)
        self.texture = _texture_volume(case.render_seed)
        self._slices: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _build_wall(self, case: Case) -> None:
        """The maternal wall as a depth profile (echogenicity and texture per 0.25 mm below the skin), and
        the near-field reverberation it causes (its strong interfaces repeated at multiples of their
        depth)."""
        m, im = case.mother, case.imaging
        z = np.arange(0.0, 260.0, 0.25)
        echo = np.full(z.shape, ECHO["maternal"], np.float32)
        texture = np.full(z.shape, TEXTURE["maternal"], np.float32)
        fat_end = 2.0 + m.fat_mm
        muscle_end = fat_end + m.muscle_mm
        echo[z < muscle_end + 1.0], texture[z < muscle_end + 1.0] = ECHO["fascia"], 0.0
        echo[z < muscle_end], texture[z < muscle_end] = ECHO["muscle"], TEXTURE["muscle"]
        fat = z < fat_end
        septa = fat & (np.cos(2 * np.pi * z / 3.7 + 2.0 * np.sin(z / 2.3)) > 0.93)
        echo[fat], texture[fat] = ECHO["fat"], 0.2
        echo[septa] = ECHO["septum"]
        echo[z < 2.0], texture[z < 2.0] = ECHO["skin"], 0.0
        self.wall_echo, self.wall_texture = echo, texture
        depth = np.linspace(R_MIN, R_MAX, N_R) - R_MIN
        rev = np.zeros(N_R)
        for interface in (fat_end, muscle_end):
            for k in (2, 3):
                rev += 0.5 ** k * np.exp(-0.5 * ((depth - k * interface) / 1.2) ** 2 - depth / 40.0)
        rev += 0.5 * np.exp(-depth / 5.0)  # the ring-down just under the face
        self.reverberation = (im.reverberation * rev).astype(np.float32)[:, None]
        self.uterus = Quadric.ellipsoid(m.uterus_center, m.uterus_semi, m.uterus_axes)
        self.myometrium_level = (1.0 + m.myometrium_mm / m.uterus_semi[2]) ** 2
        self.placenta = Quadric.ellipsoid(m.placenta_center, m.placenta_semi)

    def _build_fetus(self, case: Case) -> None:
        f = case.fetus
        a, b, c = f.semi_axes
        zs = f.standard_z
        self.trunk = Quadric.ellipsoid((0, 0, 0), (a, b, c))
        self.skin_level = (1.0 + 1.5 / b) ** 2
        self.rib_levels = ((1.0 - 0.16) ** 2, (1.0 - 0.08) ** 2)
        self.rib_mm = max(0.09 * c, 3.5)
        self.rib_z, self.rib_front = (zs - 0.1 * c, 0.85 * c), 0.5 * b  # ribs from the upper abdomen up
        self.diaphragm_z = zs + 0.28 * c
        self.bowel_z = zs - 0.3 * c
        self.organs = [
            (Quadric.ellipsoid((0.15 * a, 0.05 * b, zs + 0.12 * c), (0.8 * a, 0.75 * b, 0.3 * c)), "liver"),
            (Quadric.ellipsoid((-0.35 * a, 0.05 * b, zs + 0.1 * a), (0.25 * a, 0.2 * b, 0.3 * a)), "stomach"),
            (Quadric.ellipsoid((0.08 * a, 0.45 * b, zs), (0.06 * b, 0.32 * b, VEIN_HALF_LEVELS_MM),
                               _rotation(np.array([0.0, 0.0, 1.0]), np.deg2rad(20.0))), "vein"),
        ]
        for side in (-1.0, 1.0):
            self.organs.append((Quadric.ellipsoid((side * 0.42 * a, -0.5 * b, zs - 0.22 * c),
                                                  (0.17 * a, 0.15 * b, 0.2 * c)), "kidney"))
        self.organs += [
            (Quadric.ellipsoid((0.0, 0.3 * b, -0.72 * c), (0.22 * a, 0.2 * b, 0.14 * c)), "bladder"),
            (Quadric.ellipsoid((-0.1 * a, 0.2 * b, 0.62 * c), (0.5 * a, 0.45 * b, 0.2 * c)), "heart"),
            (Quadric.ellipsoid((-0.1 * a, 0.22 * b, 0.62 * c), (0.3 * a, 0.25 * b, 0.11 * c)), "chamber"),
        ]
        spine_r = 0.14 * b
        self.spine = Quadric(np.array([0.0, -0.75 * b, 0.0]), np.diag([1 / spine_r**2, 1 / spine_r**2, 0.0]))
        self.vertebra_mm = max(0.07 * c, 3.0)
        head = f.head_semi_axes
        self.head_z = c + 0.8 * head[2]
        self.skull = Quadric.ellipsoid((0, 0, self.head_z), head)
        self.brain_level = (1.0 - 2.5 / min(head)) ** 2
        rng = np.random.default_rng([case.render_seed, 2**30])
        femur, humerus = f.femur_mm, 0.9 * f.femur_mm
        limbs = []
        for side in (-1.0, 1.0):
            hip = np.array([side * 0.5 * a, 0.15 * b, -0.85 * c])
            thigh = np.array([side * 0.25, 0.9, rng.uniform(0.1, 0.5)])
            knee = hip + femur * thigh / np.linalg.norm(thigh)
            shin = np.array([side * 0.1, rng.uniform(-0.4, 0.1), -1.0])
            ankle = knee + femur * shin / np.linalg.norm(shin)
            shoulder = np.array([side * 0.85 * a, 0.1 * b, 0.78 * c])
            arm = np.array([side * 0.2, 0.8, rng.uniform(-0.8, -0.2)])
            elbow = shoulder + humerus * arm / np.linalg.norm(arm)
            hand = elbow + 0.9 * humerus * np.array([-side * 0.6, 0.3, 0.3])
            limbs += [(hip, knee, 0.24 * a, True), (knee, ankle, 0.2 * a, False),
                      (shoulder, elbow, 0.18 * a, True), (elbow, hand, 0.15 * a, False)]
        self.limbs = [(Quadric.ellipsoid((p + q) / 2, (r, r, np.linalg.norm(q - p) / 2 + r), _along(q - p)),
                       Quadric.ellipsoid((p + q) / 2, (0.12 * r, 0.12 * r, np.linalg.norm(q - p) / 2),
                                         _along(q - p)) if bone else None)
                      for p, q, r, bone in limbs]
        cord_r = 2.5 + 0.12 * a
        point = np.array([0.0, b + cord_r, zs - 0.05 * c])
        heading = np.array([rng.normal(0, 0.5), 1.0, rng.normal(0, 0.5)])
        self.cord = []
        for _ in range(7):
            heading = heading / np.linalg.norm(heading) + rng.normal(0, 0.6, 3)
            step = (4.0 + 0.25 * a) * heading / np.linalg.norm(heading)
            semi = (cord_r, cord_r, np.linalg.norm(step) / 2 + cord_r)
            self.cord.append(Quadric.ellipsoid(point + step / 2, semi, _along(step)))
            point = point + step

    def _plane(self, sweep: int, frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The frame's plane in fetal coordinates (origin, lateral, beam) and its world normal."""
        s, f = self.case.sweeps[sweep], self.case.fetus
        rt = f.rotation.T
        w = rt @ (s.apex[frame] - f.position)
        return w, rt @ s.lateral[frame], rt @ s.beam[frame], np.cross(s.lateral[frame], s.beam[frame])

    def _polar_q(self, k: np.ndarray) -> np.ndarray:
        """The quadratic with coefficients ``k`` at every polar sample (one matrix-vector product)."""
        return (k.astype(np.float32) @ self.basis).reshape(N_R, N_PHI)

    def _linear(self, w: np.ndarray, e1: np.ndarray, e2: np.ndarray, axis: int) -> np.ndarray:
        """One coordinate of every polar sample (a linear function of the in-plane position)."""
        return self._polar_q(np.array([0.0, 0.0, 0.0, e1[axis], e2[axis], w[axis]]))

    def _incidence(self, k: np.ndarray, where: np.ndarray) -> np.ndarray:
        """cos^2 of the angle between the beam and the normal of the quadric's level set at the samples
        ``where``: 1 where the beam meets an interface head on (a bright specular echo), 0 where it runs
        along it (the echo drops out)."""
        px, py = self.px[where], self.py[where]
        gx = 2 * k[0] * px + k[1] * py + k[3]
        gy = k[1] * px + 2 * k[2] * py + k[4]
        along = gx * self.ux[where] + gy * self.uy[where]
        return along * along / (gx * gx + gy * gy + 1e-12)

    def _interface(self, echo: np.ndarray, k: np.ndarray, q: np.ndarray, level: float, width: float) -> None:
        """Paints a specular interface at the level set ``q = level``: its thickness is ``width`` in units of
        q (about a millimetre), its brightness follows the angle of incidence."""
        band = np.abs(q - level) < width
        if band.any():
            cos2 = self._incidence(k, band)
            echo[band] = ECHO["interface"] * cos2 + echo[band] * (1.0 - cos2)

    def _texture(self, apex: np.ndarray, lateral: np.ndarray, beam: np.ndarray) -> np.ndarray:
        """The tissue texture at each sample: the case's smooth random volume (world coordinates, so a
        structure keeps its texture from frame to frame as the probe moves over it), sampled on a coarse
        polar grid and resized up: heterogeneity at a few millimetres; finer grain is the speckle's."""
        px, py = self.px[::TEXTURE_STEP, ::TEXTURE_STEP], self.py[::TEXTURE_STEP, ::TEXTURE_STEP]
        points = [(apex[i] + px * lateral[i] + py * beam[i]) / TEXTURE_VOXEL_MM for i in range(3)]
        coarse = map_coordinates(self.texture, points, order=1, mode="grid-wrap").astype(np.float32)
        return cv2.resize(coarse, (N_PHI, N_R), interpolation=cv2.INTER_LINEAR)

    def echogenicity(self, sweep: int, frame: int) -> np.ndarray:
        """The (N_R, N_PHI) echogenicity map of the frame's plane, painted back to front (contact aside)."""
        s = self.case.sweeps[sweep]
        apex, lateral, beam = s.apex[frame], s.lateral[frame], s.beam[frame]
        depth = apex[2] + self.px * np.float32(lateral[2]) + self.py * np.float32(beam[2])
        index = np.clip((depth * 4.0).astype(np.int32), 0, len(self.wall_echo) - 1)
        echo, texture = self.wall_echo[index], self.wall_texture[index]
        ku = self.uterus.coefficients(apex, lateral, beam)
        qu = self._polar_q(ku)
        wall = qu <= self.myometrium_level
        echo[wall], texture[wall] = ECHO["myometrium"], TEXTURE["myometrium"]
        cavity = qu <= 1
        echo[cavity], texture[cavity] = ECHO["fluid"], 0.0
        if self.placenta.reaches(apex, lateral, beam, np.cross(lateral, beam)):
            placenta = cavity & (self._polar_q(self.placenta.coefficients(apex, lateral, beam)) <= 1)
            echo[placenta], texture[placenta] = ECHO["placenta"], TEXTURE["placenta"]
        self._interface(echo, ku, qu, 1.0, 0.02)
        self._paint_fetus(echo, texture, *self._plane(sweep, frame)[:3])
        echo *= np.maximum(1.0 + texture * self._texture(apex, lateral, beam), 0.3)
        return echo

    def _paint_fetus(self, echo: np.ndarray, texture: np.ndarray, w: np.ndarray, e1: np.ndarray,
                     e2: np.ndarray) -> None:
        normal = np.cross(e1, e2)
        fluid = echo < FLUID_ECHO
        if self.skull.reaches(w, e1, e2, normal):
            ks = self.skull.coefficients(w, e1, e2)
            qs = self._polar_q(ks)
            skull = qs <= 1
            echo[skull] = ECHO["skull"] * (0.3 + 0.7 * self._incidence(ks, skull))
            texture[skull] = 0.0
            brain = qs <= self.brain_level
            echo[brain] = ECHO["brain"]
            echo[brain & (np.abs(self._linear(w, e1, e2, 0)) < 0.8)] = ECHO["falx"]
        for soft, bone in self.limbs:
            if soft.reaches(w, e1, e2, normal):
                limb = (self._polar_q(soft.coefficients(w, e1, e2)) <= 1) & fluid
                echo[limb], texture[limb] = ECHO["limb"], TEXTURE["limb"]
                if bone is not None and bone.reaches(w, e1, e2, normal):
                    bony = limb & (self._polar_q(bone.coefficients(w, e1, e2)) <= 1)
                    echo[bony], texture[bony] = ECHO["bone"], 0.0
        for segment in self.cord:
            if segment.reaches(w, e1, e2, normal):
                cord = (self._polar_q(segment.coefficients(w, e1, e2)) <= 1) & fluid
                echo[cord], texture[cord] = ECHO["cord"], TEXTURE["cord"]
        if not self.trunk.reaches(w, e1, e2, normal):
            return
        kt = self.trunk.coefficients(w, e1, e2)
        qt = self._polar_q(kt)
        echo[qt <= self.skin_level] = ECHO["interface"]
        trunk = qt <= 1
        if not trunk.any():
            return
        fz = self._linear(w, e1, e2, 2)
        region = np.where(fz > self.diaphragm_z, 2, np.where(fz < self.bowel_z, 1, 0))
        names = ("body", "bowel", "lung")
        echo[trunk] = np.array([ECHO[n] for n in names], np.float32)[region[trunk]]
        texture[trunk] = np.array([TEXTURE[n] for n in names], np.float32)[region[trunk]]
        for organ, name in self.organs:
            if organ.reaches(w, e1, e2, normal):
                inside = trunk & (self._polar_q(organ.coefficients(w, e1, e2)) <= 1)
                echo[inside], texture[inside] = ECHO[name], TEXTURE.get(name, 0.0)
        self._interface(echo, kt, qt, self.skin_level, 0.03)
        fy = self._linear(w, e1, e2, 1)
        ribs = ((qt >= self.rib_levels[0]) & (qt <= self.rib_levels[1]) & (fz > self.rib_z[0])
                & (fz < self.rib_z[1]) & (fy < self.rib_front) & (np.cos(2 * np.pi * fz / self.rib_mm) > 0.8))
        echo[ribs], texture[ribs] = ECHO["rib"], 0.0
        spine = trunk & (self._polar_q(self.spine.coefficients(w, e1, e2)) <= 1)
        bone = np.cos(2 * np.pi * fz / self.vertebra_mm) > -0.3
        echo[spine] = np.where(bone[spine], ECHO["spine"], ECHO["spine_gap"])
        texture[spine] = 0.0

    def _contact_beams(self, sweep: int, frame: int) -> np.ndarray:
        lo, hi = self.case.sweeps[sweep].contact[frame]
        return (self.phi >= lo) & (self.phi <= hi)

    def _slice_iq(self, sweep: int, index: int) -> np.ndarray:
        """The complex (I, Q) scatter of one elevational slice, blurred by the depth-dependent
        point-spread; the last few are kept, since neighbouring frames share them."""
        key = (sweep, index)
        if key not in self._slices:
            rng = np.random.default_rng([self.case.render_seed, sweep, index + 2**31, 2**29])  # index < 0 too
            wd = self.depth_weight
            parts = []
            for part in rng.standard_normal((2, N_R, N_PHI), dtype=np.float32):
                near = cv2.GaussianBlur(part, (7, 7), NEAR_PSF[0], sigmaY=NEAR_PSF[1])
                far = cv2.GaussianBlur(part, (7, 7), FAR_PSF[0], sigmaY=FAR_PSF[1])
                parts.append(near + wd * (far - near))
            self._slices[key] = np.stack(parts)
            while len(self._slices) > 4:
                self._slices.popitem(last=False)
        return self._slices[key]

    def _speckle_iq(self, sweep: int, frame: int) -> np.ndarray:
        """The frame's (I, Q): scatter fixed to the tissue along the sweep, so frames closer than the
        elevational beam width share most of their speckle (and a probe that moves back sees it again),
        farther ones none. Between two slices the mix keeps unit variance."""
        position = self.case.sweeps[sweep].elevation[frame] / SPECKLE_SLICE_MM
        index = int(np.floor(position))
        angle = (position - index) * np.pi / 2
        return (np.float32(np.cos(angle)) * self._slice_iq(sweep, index)
                + np.float32(np.sin(angle)) * self._slice_iq(sweep, index + 1))

    def render(self, sweep: int, frame: int) -> np.ndarray:
        """B-mode frame: speckle with depth-dependent grain, lateral blur, attenuation by tissue with the
        case's TGC and gain (shadowing behind bone, enhancement behind fluid), reverberation, noise floor,
        contact, log compression, scan conversion."""
        im = self.case.imaging
        rng = np.random.default_rng([self.case.render_seed, sweep, frame])
        draws = rng.standard_normal((N_R, N_PHI), dtype=np.float32)
        echo = self.echogenicity(sweep, frame)
        fluid = echo < FLUID_ECHO
        echo[fluid & (draws > 3.1)] = ECHO["particle"]
        echo = cv2.GaussianBlur(echo, (5, 3), 1.1, sigmaY=0.6)
        att = np.where(echo >= BONE_ECHO, self.attenuation["bone"],
                       np.where(fluid, self.attenuation["fluid"], self.attenuation["tissue"]))
        loss = np.exp(np.cumsum(att, axis=0, dtype=np.float32) * np.float32(-np.log(10) / 20))
        i, q = self._speckle_iq(sweep, frame)
        speckle = np.sqrt(i * i + q * q) * self.speckle_gain
        contact = self._contact_beams(sweep, frame)
        signal = (echo * loss + self.reverberation) * speckle * contact
        signal[:, ~contact] += self.reverberation[:, 0, None] * 4.0 * speckle[:, ~contact]
        envelope = signal * self.tgc + np.abs(draws) * np.float32(im.noise_floor) * self.tgc + 1e-5
        db = 20.0 * np.log10(envelope / 5.0)
        scale = 255.0 / im.dynamic_range_db
        polar = np.clip((db + im.dynamic_range_db) * scale, 0, 255).astype(np.uint8)
        return cv2.remap(polar, self.map_x, self.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)

    def textured_share(self, sweep: int, frame: int) -> float:
        """Area share of the sector that is tissue (not fluid, not out of contact) in this frame."""
        echo = self.echogenicity(sweep, frame)
        tissue = (echo >= FLUID_ECHO) & self._contact_beams(sweep, frame)[None]
        area = np.hypot(self.px, self.py)
        return float((tissue * area).sum() / area.sum())

    def truth(self, sweep: int, frame: int) -> dict:
        """Frame label, labelled abdomen mask and the geometry the label was decided on."""
        f = self.case.fetus
        w, e1, e2, normal = self._plane(sweep, frame)
        apex = self.case.sweeps[sweep].apex[frame]
        lo, hi = self.case.sweeps[sweep].contact[frame]
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
            inside = bool(np.all((r >= R_MIN) & (r <= R_MAX) & (phi >= lo) & (phi <= hi)))
            if angle <= SUBOPTIMAL_ANGLE_DEG and lo < hi:  # beyond it the label is 0 whatever the mask
                self._abdomen_pixels(mask, k, center, np.linalg.inv(quad) * level, w, e1, e2, (lo, hi))
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
                        w: np.ndarray, e1: np.ndarray, e2: np.ndarray, span: tuple[float, float]) -> None:
        """Sets the contacted sector pixels inside the trunk section and within the abdominal levels,
        evaluated only in the section's bounding box."""
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
        phi = self.pixel_phi[r0:r1, c0:c1]
        inside = ((q <= 1) & (np.abs(fz - self.case.fetus.standard_z) <= limit) & self.sector[r0:r1, c0:c1]
                  & (phi >= span[0]) & (phi <= span[1]))
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
