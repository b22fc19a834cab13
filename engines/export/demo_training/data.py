"""The training data: phantom frames prepared exactly as the live pipeline prepares them (pipeline.letterbox,
area filter), kept where they teach most. Most blind-sweep frames are background, so the pool keeps every
frame near the standard plane and each epoch draws a fresh class-balanced sample from it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from pipeline.letterbox import Letterbox, Prepared
from pipeline.phantom import SWEEPS, Case, Renderer, make_cases

SIZE = 224
RESIZE = "area"
LETTERBOX = Letterbox(SIZE, 1, interpolation=RESIZE)
"""The demo bundle's input (224, grey, padded to square, area filter) as the preprocess stage makes it."""
NEAR_DISTANCE_MM = 25.0  # "near" background / suboptimal frames: within this of the standard plane
HARD_ANGLE_MAX = 20.0  # hard negatives: planes nearly perpendicular to the spine ...
HARD_DISTANCE_MM = 8.0  # ... and within this of the standard plane, yet not optimal (a few frames away)
PAIR_DISTANCE_MM = 4.0  # ranking pairs: two frames of one sweep crossing, both within this of the plane ...
PAIR_MIN_GAP_MM = 0.75  # ... and at least this much closer or farther than each other
EPOCH_SHARES = {"optimal": 0.3, "hard": 0.2, "lookalike": 0.2, "suboptimal": 0.15, "background": 0.15}


@dataclass
class FramePool:
    """Prepared frames: uint8 model inputs [N, S, S], soft abdomen masks 0..255 [N, S, S], labels [N], and
    each frame's plane geometry [N] (distance to the standard plane in mm, angle to it in degrees) and
    sweep [N] (an id shared by the frames of one sweep of one case)."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    distance: np.ndarray
    angle: np.ndarray
    sweep: np.ndarray

    def strata(self) -> dict[str, np.ndarray]:
        """Indices per sampling stratum. "hard" holds the frames a few mm off the standard plane, optimal
        or not by a hair: they teach the plane's exact level, and are rare in a blind sweep. "lookalike"
        holds the other transverse planes with no abdomen in view (the head's skull ring, the thorax, the
        pelvis): round sections the model took for the abdomen when they were drawn only as background."""
        transverse = self.angle <= HARD_ANGLE_MAX
        hard = (self.labels != 1) & (self.distance <= HARD_DISTANCE_MM) & transverse
        lookalike = (self.labels == 0) & ~hard & transverse
        return {
            "optimal": np.flatnonzero(self.labels == 1),
            "hard": np.flatnonzero(hard),
            "lookalike": np.flatnonzero(lookalike),
            "suboptimal": np.flatnonzero((self.labels == 2) & ~hard),
            "background": np.flatnonzero((self.labels == 0) & ~hard & ~lookalike),
        }

    def counts(self) -> dict[str, int]:
        return {name: len(indices) for name, indices in self.strata().items()}

    def pairs(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """[count, 2] indices of frames of the same sweep crossing, both near the standard plane, one
        clearly closer than the other: what the pipeline must tell apart when it picks a sweep's best frame
        (empty when the pool has no such frames)."""
        near = np.flatnonzero((self.distance <= PAIR_DISTANCE_MM) & (self.angle <= HARD_ANGLE_MAX))
        by_sweep = {s: near[self.sweep[near] == s] for s in np.unique(self.sweep[near])}
        found: list[tuple[int, int]] = []
        for _ in range(20 * count):
            if len(found) == count or not len(near):
                break
            anchor = int(rng.choice(near))
            mates = by_sweep[self.sweep[anchor]]
            mates = mates[np.abs(self.distance[mates] - self.distance[anchor]) >= PAIR_MIN_GAP_MM]
            if len(mates):
                found.append((anchor, int(rng.choice(mates))))
        return np.asarray(found, np.int64).reshape(-1, 2)


def prepare(frame: np.ndarray, mask: np.ndarray, letterbox: Letterbox = LETTERBOX
            ) -> tuple[Prepared, np.ndarray]:
    """The model input exactly as the live pipeline makes it for a bundle (``letterbox``: the demo's by
    default, a FetalCLIP bundle's bicubic one for the heads trainer), with the geometry back to the frame,
    and the abdomen mask (labels 1, 2) through the same letterbox as a soft 0..255 target."""
    return letterbox(frame), letterbox((mask > 0).astype(np.uint8) * 255).pixels


def plane_geometry(case: Case, sweep: int) -> tuple[np.ndarray, np.ndarray]:
    """Per frame of a sweep: angle (deg) between plane normal and spine, distance (mm) to the standard plane
    centre; the same quantities the phantom labels frames by, for all frames at once (no rendering)."""
    s, fetus = case.sweeps[sweep], case.fetus
    normal = np.cross(s.lateral, s.beam)
    angle = np.degrees(np.arccos(np.minimum(1.0, np.abs(normal @ fetus.spine_axis))))
    distance = np.abs(np.einsum("ij,ij->i", normal, fetus.standard_center[None] - s.apex))
    return angle, distance


def pick_frames(case: Case, rng: np.random.Generator, per_case: int) -> list[tuple[int, int]]:
    """(sweep, frame) pairs to train on from one case: every frame within a few mm of the standard plane
    (candidate optimal frames and the hard negatives around them), then ``per_case`` more, a third near the
    standard plane (suboptimal / background), a third transverse planes far from it (head, thorax, pelvis)
    and a third anywhere."""
    close, near, transverse, anywhere = [], [], [], []
    for sweep in range(SWEEPS):
        angle, distance = plane_geometry(case, sweep)
        frames = np.arange(len(angle))
        candidate = (angle <= HARD_ANGLE_MAX) & (distance <= HARD_DISTANCE_MM)
        close += [(sweep, int(f)) for f in frames[candidate]]
        near += [(sweep, int(f)) for f in frames[(angle <= 40.0) & (distance <= NEAR_DISTANCE_MM)]]
        far = (angle <= HARD_ANGLE_MAX) & (distance > NEAR_DISTANCE_MM)
        transverse += [(sweep, int(f)) for f in frames[far]]
        anywhere += [(sweep, int(f)) for f in frames]
    chosen = dict.fromkeys(close)
    third = per_case // 3
    for group, count in ((near, third), (transverse, third), (anywhere, per_case - 2 * third)):
        group = [p for p in group if p not in chosen]
        for i in rng.permutation(len(group))[:count]:
            chosen[group[i]] = None
    return sorted(chosen)


def phantom_case(seed: int, frames_per_sweep: int) -> Case:
    """The one case of a phantom seed (training and validation use one case per seed)."""
    return make_cases(seed, 1, frames_per_sweep)[0]


def build_pool(seeds: Sequence[int], frames_per_sweep: int, per_case: int, data_seed: int) -> FramePool:
    """Render and prepare the training frames of the given phantom seeds (deterministic)."""
    rng = np.random.default_rng(data_seed)
    images, masks, labels, distances, angles, sweeps = [], [], [], [], [], []
    for number, seed in enumerate(tqdm(seeds, desc="render training cases", unit="case")):
        case = phantom_case(seed, frames_per_sweep)
        renderer = Renderer(case)
        for sweep, frame in pick_frames(case, rng, per_case):
            sweeps.append(number * SWEEPS + sweep)
            truth = renderer.truth(sweep, frame)
            prepared, soft = prepare(renderer.render(sweep, frame), truth["mask"])
            images.append(prepared.pixels)
            masks.append(soft)
            labels.append(truth["label"])
            distances.append(truth["distance_mm"])
            angles.append(truth["angle_deg"])
    return FramePool(np.stack(images), np.stack(masks), np.asarray(labels, np.int64),
                     np.asarray(distances, np.float32), np.asarray(angles, np.float32),
                     np.asarray(sweeps, np.int64))


def epoch_batches(pool: FramePool, steps: int, batch: int, pairs: int, rng: np.random.Generator
                  ) -> list[tuple[np.ndarray, int]]:
    """Each batch's pool indices and its number of ranking pairs: first the pairs (frames 2i and 2i + 1),
    then a stratified draw for the rest of the batch."""
    pairs = min(pairs, batch // 2)
    ranked = pool.pairs(steps * pairs, rng)
    per_batch = len(ranked) // steps
    rest = epoch_indices(pool, steps * (batch - 2 * per_batch), rng).reshape(steps, -1)
    return [(np.concatenate([ranked[b * per_batch : (b + 1) * per_batch].ravel(), rest[b]]), per_batch)
            for b in range(steps)]


def epoch_indices(pool: FramePool, count: int, rng: np.random.Generator) -> np.ndarray:
    """A stratified draw (with replacement) of ``count`` pool indices in the ``EPOCH_SHARES`` proportions,
    over whichever strata have frames."""
    return stratified_draw(pool.strata(), EPOCH_SHARES, count, rng)


def stratified_draw(strata: dict[str, np.ndarray], shares: dict[str, float], count: int,
                    rng: np.random.Generator) -> np.ndarray:
    """``count`` indices drawn with replacement from the strata in the ``shares`` proportions, over
    whichever strata have frames; the one sampler of both trainers (most blind-sweep frames are
    background, so each epoch is a fresh class-balanced draw)."""
    strata = {name: indices for name, indices in strata.items() if len(indices)}
    weights = np.array([shares[name] for name in strata])
    shares = np.floor(count * weights / weights.sum()).astype(int)
    shares[: count - shares.sum()] += 1
    picks = [rng.choice(g, size=n, replace=True) for g, n in zip(strata.values(), shares, strict=True)]
    return rng.permutation(np.concatenate(picks))

