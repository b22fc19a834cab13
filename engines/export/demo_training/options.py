"""One training run's options, checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engines.export.demo import DemoConfig

MIN_TRAIN_SEED = 1000
"""Phantom seeds below this are kept for evaluation and never trained on."""


class TrainError(ValueError):
    """Bad options for a training run."""


@dataclass(frozen=True)
class TrainOptions:
    """One training run; every field is a command-line option with the same name."""

    out: Path
    seed: int = 1000
    cases: int = 240
    frames_per_sweep: int = 280
    per_case: int = 36
    val_seed: int = 1900
    val_cases: int = 3
    val_frames_per_sweep: int = 140
    epochs: int = 24
    samples_per_epoch: int = 4096
    batch: int = 32
    pairs_per_batch: int = 8
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    threads: int = 2
    config: DemoConfig = field(default_factory=DemoConfig)

    def check(self) -> None:
        """Raise TrainError with one line naming the first bad option."""
        if self.seed < MIN_TRAIN_SEED:
            problem = f"training seeds start at {MIN_TRAIN_SEED} (lower ones are left for evaluation)"
            raise TrainError(f"--seed {self.seed}: {problem}")
        if self.val_seed < MIN_TRAIN_SEED or self.seed <= self.val_seed < self.seed + self.cases:
            raise TrainError(
                f"--val-seed {self.val_seed}: must be >= {MIN_TRAIN_SEED} and outside the training seeds "
                f"{self.seed}..{self.seed + self.cases - 1}"
            )
        overlap = self.val_seed < self.seed + self.cases and self.seed < self.val_seed + self.val_cases
        if overlap:
            raise TrainError(f"--val-seed {self.val_seed}: validation cases overlap the training seeds")
        positive = {
            "cases": self.cases, "frames-per-sweep": self.frames_per_sweep, "per-case": self.per_case,
            "epochs": self.epochs, "samples-per-epoch": self.samples_per_epoch, "batch": self.batch,
            "threads": self.threads, "val-cases": self.val_cases,
            "val-frames-per-sweep": self.val_frames_per_sweep,
        }
        for name, value in positive.items():
            if value < 1:
                raise TrainError(f"--{name} must be >= 1, got {value}")
        if self.pairs_per_batch < 0:
            raise TrainError(f"--pairs-per-batch must be >= 0, got {self.pairs_per_batch}")
        if self.out.exists() and not self.out.is_dir():
            raise TrainError(f"--out {self.out}: exists and is not a directory")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise TrainError("--lr must be > 0 and --weight-decay >= 0")

    @property
    def train_seeds(self) -> range:
        return range(self.seed, self.seed + self.cases)

    @property
    def val_seeds(self) -> range:
        return range(self.val_seed, self.val_seed + self.val_cases)
