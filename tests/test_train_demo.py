"""The demo trainer (engines/export/demo_training) end to end on a tiny run, its re-validation, and the
committed demo bundle on held-out phantom frames."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("open_clip")

from engines.base import EngineOptions  # noqa: E402
from engines.bundle import load_bundle  # noqa: E402
from engines.export.demo_training import cli, run  # noqa: E402
from engines.export.demo_training.data import plane_geometry, prepare  # noqa: E402
from engines.export.demo_training.options import TrainOptions  # noqa: E402
from engines.export.demo_training.validate import MIN_SCORE, pipeline_pick  # noqa: E402
from engines.onnxruntime import OrtEngine  # noqa: E402
from pipeline import acouslic  # noqa: E402
from pipeline.phantom import SWEEPS, Renderer, make_cases  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "bundles" / "demo"



def tiny(out: Path) -> TrainOptions:
    """A run that takes seconds: 2 cases, a few frames each, 2 steps, 1 validation case of 10-frame sweeps."""
    return TrainOptions(
        out=out, cases=2, frames_per_sweep=140, per_case=4, epochs=1, samples_per_epoch=16, batch=8,
        val_cases=1, val_frames_per_sweep=10,
    )


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("train_demo")
    first, second = root / "a", root / "b"
    opts = tiny(first)
    metrics = run.run(opts, run.command_line(opts, TrainOptions(out=first)))
    run.run(tiny(second), "same options again")
    return first, second, metrics


def test_tiny_run_writes_a_loadable_bundle(tiny_runs: tuple[Path, Path, dict]) -> None:
    out, _, metrics = tiny_runs
    bundle = load_bundle(out)
    assert bundle.best_frame.output == "quality"
    assert bundle.input.resize == "area" and bundle.input.channels == 1 and bundle.input.pad_to_square
    assert bundle.outputs["planes"].classes == ("abdomen_optimal", "abdomen_suboptimal", "other")
    engine = OrtEngine(bundle, EngineOptions(device="cpu", threads=2, max_batch=4))
    engine.load()
    got = engine.infer(np.zeros((3, 224, 224), np.uint8))
    assert got["quality"].shape == (3,) and got["planes"].shape == (3, 3)
    assert got["embedding"].shape == (3, 128)
    assert got["mask"].shape == (3, 224, 224) and got["mask"].dtype == np.uint8
    assert np.allclose(got["planes"].sum(1), 1.0, atol=1e-5)
    engine.close()

    training = bundle.manifest["training"]
    assert training["command"].startswith("python tools/train_demo.py --out ")
    assert "--cases 2" in training["command"] and "--epochs 1" in training["command"]
    assert training["seeds"]["phantom_train"] == [1000, 1001] and training["seeds"]["torch"] == 1000
    headline = {"pick_optimal_rate", "quality_f1", "mask_dice_labelled", "median_ac_nae_pick"}
    assert set(training["metrics"]["validation"]) >= headline
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["sha256"] == bundle.sha256 == metrics["sha256"]
    assert saved["validation"]["frames"] == SWEEPS * 10
    # The int8 gate decides whether the int8 model ships; either way bundle, file and metrics agree.
    assert saved["int8"]["kept"] == (out / "model.int8.onnx").is_file() == (bundle.int8_path is not None)


def test_same_seed_gives_the_same_model(tiny_runs: tuple[Path, Path, dict]) -> None:
    first, second, _ = tiny_runs
    for name in ("model.onnx", "model.int8.onnx"):
        assert (first / name).is_file() == (second / name).is_file()
        if (first / name).is_file():
            assert (first / name).read_bytes() == (second / name).read_bytes(), name


def _without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def test_revalidate_rewrites_only_the_recorded_metrics(tiny_runs: tuple[Path, Path, dict],
                                                       tmp_path: Path) -> None:
    first, _, metrics = tiny_runs
    out = tmp_path / "bundle"
    shutil.copytree(first, out)
    models = {p.name: p.read_bytes() for p in out.glob("*.onnx")}
    before = load_bundle(out).manifest
    assert cli.main(["--out", str(out), "--revalidate"]) == 0
    after = load_bundle(out).manifest
    assert {p.name: p.read_bytes() for p in out.glob("*.onnx")} == models
    assert _without(after, "training") == _without(before, "training")
    assert _without(after["training"], "metrics") == _without(before["training"], "metrics")
    command = f"python tools/train_demo.py --out {out} --revalidate"
    assert after["training"]["metrics"] == {**before["training"]["metrics"], "revalidated_by": command}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["validation"] == metrics["validation"] and saved["revalidation"]["command"] == command


def test_bad_options_are_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--out", str(tmp_path / "x"), "--seed", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    problem = "training seeds start at 1000 (lower ones are left for evaluation)"
    assert err == [f"train_demo: error: --seed 5: {problem}"]
    assert cli.main(["--out", str(tmp_path / "x"), "--val-seed", "1003"]) == 1
    assert "outside the training seeds" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_selection_helpers() -> None:
    # The pipeline's rule with its default settings: the highest score that reaches min_score.
    scores = np.array([0.1] * 10 + [0.6] * 5 + [0.97, 0.9] + [0.6] * 5 + [0.1] * 10)
    pick, top = pipeline_pick(scores)
    ids = [f.frame_id for f in top]
    assert pick == 15 and ids[0] == 15 and len(set(ids)) == len(ids) <= 5
    assert pipeline_pick(np.full(20, 0.2)) == (None, ())


# --------------------------------------------------------------------------- the committed bundle


def _fetal_levels(case: object, sweep: int) -> np.ndarray:
    """Per frame of a sweep: the fetal level (mm along the spine from the trunk centre, towards the head)
    where the frame's plane crosses the spine."""
    s, fetus = case.sweeps[sweep], case.fetus
    normal = np.cross(s.lateral, s.beam)
    return np.einsum("ij,ij->i", normal, s.apex - fetus.position) / (normal @ fetus.spine_axis)


def _held_out_frames() -> tuple[object, int, int, int, int]:
    """A held-out phantom case (seed < 1000) with an optimal frame in a transverse sweep that also reaches
    the head: (renderer, sweep, optimal, trunk, head) - ``trunk`` the frame at the level of the trunk
    farthest from the standard plane (thorax or pelvis, no abdomen), ``head`` the frame farthest past the
    trunk's end on the head's side."""
    for seed in range(1, 30):
        case = make_cases(seed, 1)[0]
        renderer = Renderer(case)
        half_length = case.fetus.semi_axes[2]
        for sweep in range(SWEEPS):
            angle, distance = plane_geometry(case, sweep)
            level = _fetal_levels(case, sweep)
            in_trunk = np.flatnonzero(np.abs(level) < 0.8 * half_length)
            beyond = np.flatnonzero(level > half_length + case.fetus.head_semi_axes[2])
            for frame in np.flatnonzero((angle <= 10) & (distance <= 2)):
                if renderer.truth(sweep, int(frame))["label"] == 1 and len(beyond):
                    trunk = int(in_trunk[np.argmax(distance[in_trunk])])
                    head = int(beyond[np.argmin(level[beyond])])
                    assert renderer.truth(sweep, trunk)["label"] == renderer.truth(sweep, head)["label"] == 0
                    return renderer, sweep, int(frame), trunk, head
    raise AssertionError("no optimal frame in a sweep that reaches the head, phantom seeds 1..29")


def _demo_outputs(frames: tuple[int, ...]) -> tuple[dict, list]:
    """The committed demo's int8 outputs on frames of the held-out sweep, with their prepared truth masks."""
    renderer, sweep = _held_out_frames()[:2]
    prepared = [prepare(renderer.render(sweep, f), renderer.truth(sweep, f)["mask"]) for f in frames]
    engine = OrtEngine(load_bundle(DEMO), EngineOptions(device="cpu", threads=2, max_batch=len(frames)))
    engine.load()
    got = engine.infer(np.stack([p.pixels for p, _ in prepared]))
    engine.close()
    return got, [soft >= 128 for _, soft in prepared]


@pytest.mark.skipif(not (DEMO / "bundle.json").is_file(), reason="bundles/demo not built")
def test_committed_demo_bundle() -> None:
    bundle = load_bundle(DEMO)
    assert sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file()) < 10_000_000
    training = bundle.manifest["training"]
    assert training["command"].startswith("python tools/train_demo.py --out bundles/demo")
    seeds = training["seeds"]
    assert min(seeds["phantom_train"]) >= 1000 and min(seeds["phantom_validation"]) >= 1000
    assert "quality_f1" in training["metrics"]["validation"]
    assert bundle.best_frame.output == "quality" and bundle.input.resize == "area"
    assert bundle.best_frame.min_score == MIN_SCORE
    assert bundle.int8_path is not None and bundle.manifest["model"]["int8"]["gate"]["passed"]

    _, _, optimal, trunk, head = _held_out_frames()
    got, truth = _demo_outputs((optimal, trunk, head))
    assert got["quality"][0] > 0.5 > max(got["quality"][1:])
    assert acouslic.dice(got["mask"][0], truth[0]) > 0.8
    assert got["mask"][1].sum() < 0.1 * truth[0].sum()  # another level of the trunk is no abdomen


@pytest.mark.skipif(not (DEMO / "bundle.json").is_file(), reason="bundles/demo not built")
@pytest.mark.xfail(strict=True, reason="a known weakness of the demo (issue 14): its mask head outlines part "
                   "of the fetal head, a round bright-rimmed lookalike, though its quality stays low")
def test_the_demo_masks_no_fetal_head() -> None:
    _, _, optimal, _, head = _held_out_frames()
    got, truth = _demo_outputs((optimal, head))
    assert got["mask"][1].sum() < 0.1 * truth[0].sum()
