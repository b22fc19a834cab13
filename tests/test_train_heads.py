"""The heads trainer (tools/train_heads.py) on phantom cases in ACOUSLIC-AI's layout: real open_clip models,
real .mha files, real processes (interrupted with SIGKILL and resumed), real bundles through the real
pipeline. The ViT-L/14 test runs only under ``-m slow``."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, read_journal, run_pipeline

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
pytest.importorskip("SimpleITK")

from engines.bundle import load_bundle  # noqa: E402
from engines.export.demo_training import heads_cli  # noqa: E402
from engines.export.demo_training.finetune import (  # noqa: E402
    HeadsModel,
    HeadsOptions,
    build_heads,
    fresh_lora,
    lora_parameter_names,
    losses,
    probe_blocks,
    run,
    trainable,
)
from engines.export.demo_training.train import optimizer_step  # noqa: E402
from engines.export.fetalclip import build_model, load_config  # noqa: E402
from engines.export.heads import attach_lora, load_heads, save_heads  # noqa: E402
from pipeline.evaluation import phantom_cases  # noqa: E402
from pipeline.evaluation.layout import CSV_PATH, IMAGES_DIR, MASKS_DIR, read_mha, write_mha  # noqa: E402
from pipeline.letterbox import Letterbox  # noqa: E402

TRAIN_HEADS = REPO / "tools" / "train_heads.py"
BUILD_BUNDLE = REPO / "tools" / "build_bundle.py"
# The learning check's small backbone: pretrained here on phantom cases of other seeds, then fresh heads.
PRETRAIN_SEED, HEADS_SEED = 1000, 2000
# Its architecture: the tiny ViT's, at patch 16 and width 96 (196 tokens). On issue 14's tissue-filled phantom
# the tiny ViT's patch 32 (49 tokens) learned nothing it could pass on in CI's time, measured: 1000 steps on
# 24 cases reached a validation Dice of 0.10 and quality F1 0.29 (chance 0.27); this one, in 600: 0.35, 0.33.
LEARNER = {"embed_dim": 64,
           "vision_cfg": {"image_size": 224, "layers": 4, "width": 96, "head_width": 32, "patch_size": 16},
           "text_cfg": {"context_length": 117, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
SMALL = ("--batch", "8", "--mask-channels", "32", "--threads", "2", "--lr", "2e-3")


def tool(script: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def make_phantoms(out: Path, cases: int, seed: int, frames: int) -> Path:
    assert phantom_cases.main(["--out", str(out), "--cases", str(cases), "--seed", str(seed),
                               "--frames-per-sweep", str(frames), "--no-video"]) == 0
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train_heads")


@pytest.fixture(scope="module")
def three_cases(workdir: Path) -> Path:
    return make_phantoms(workdir / "three", 3, 0, 20)


@pytest.fixture(scope="module")
def tiny_ckpt(workdir: Path) -> Path:
    torch.manual_seed(0)
    path = workdir / "tiny.pt"
    torch.save({"state_dict": build_model(load_config("tiny")).state_dict()}, path)
    return path


# --------------------------------------------------------------------------- the interface


def test_the_interface_command_and_its_bundle(workdir: Path, three_cases: Path, tiny_ckpt: Path) -> None:
    """The issue's interface, verbatim: one epoch on three phantom cases, then build_bundle --heads."""
    heads = workdir / "interface" / "heads.pt"
    result = tool(TRAIN_HEADS, "--weights", str(tiny_ckpt), "--config", "tiny", "--cases", str(three_cases),
                  "--out", str(heads), "--epochs", "1")
    assert result.returncode == 0, result.stderr
    loaded = load_heads(heads)
    assert loaded.quality is not None and loaded.mask is not None
    assert loaded.mask.blocks == probe_blocks(4) == (0, 1, 3)
    # FetalCLIP-IQA's targets on every block of the tiny ViT: c_fc, c_proj, out_proj, rank 8, alpha 16.
    assert len(loaded.lora) == 3 * 4
    assert {name.split(".")[-2] for name in loaded.lora} == {"c_fc", "c_proj", "out_proj"}
    assert all(e["A"].shape[0] == 8 and e["alpha"] == 16.0 for e in loaded.lora.values())
    run_folder = heads.with_name("heads.run")
    metrics = json.loads((run_folder / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1]
    assert {"quality_f1", "seg_f1", "dice_positive"} <= set(metrics["history"][0]["validation"])
    assert metrics["data"]["train_cases"] + metrics["data"]["validation_cases"] == 3
    assert (run_folder / "curves.png").stat().st_size > 1000
    assert metrics["letterbox"]["interpolation"] == "bicubic"  # what the pipeline feeds a tiny bundle
    linked = sorted(p.stem for p in (run_folder / "validation_cases" / IMAGES_DIR).glob("*.mha"))
    assert linked == sorted(metrics["data"]["validation_ids"]) and len(linked) == 1

    result = tool(BUILD_BUNDLE, "--weights", str(tiny_ckpt), "--config", "tiny", "--heads", str(heads),
                  "--out", str(workdir / "interface" / "bundle"), "--check-frames", "2")
    assert result.returncode == 0, result.stderr
    bundle = load_bundle(workdir / "interface" / "bundle")
    assert {"quality", "mask"} <= set(bundle.outputs) and bundle.best_frame.output == "quality"


def test_the_split_is_by_subject(workdir: Path, three_cases: Path, tiny_ckpt: Path) -> None:
    """Two cases of one subject (the CSV says so) land on the same side, whatever the seed."""
    cases = workdir / "subjects"
    shutil.copytree(three_cases, cases)
    rows = list(csv.reader((cases / CSV_PATH).open()))
    rows[2][1] = rows[1][1]  # the second case belongs to the first case's subject
    with (cases / CSV_PATH).open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    from engines.export.demo_training.cases import find_cases, split_by_subject

    found = find_cases(cases)
    for seed in range(6):
        train, val = split_by_subject(found, val_fraction=0.3, folds=1, fold=0, seed=seed, where=cases)
        sides = {c.case_id: c in val for c in found}
        assert sides[rows[1][0]] == sides[rows[2][0]]
        assert {c.subject for c in train}.isdisjoint({c.subject for c in val})


# --------------------------------------------------------------------------- bad input


def _one_line_error(code: int, stderr: str, named: Path, problem: str) -> None:
    """Exit 1 and one error line, the last one (progress bars of the frame cache may come before it)."""
    assert code == 1
    lines = stderr.strip().replace("\r", "\n").splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]] and lines[-1].startswith("train_heads: error: "), stderr
    assert "Traceback" not in stderr
    assert str(named) in lines[-1] and problem in lines[-1], lines[-1]


def test_bad_input_is_one_line_naming_the_file_before_training(workdir: Path, three_cases: Path,
                                                                tiny_ckpt: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The command's own main (in this process: one torch import for all of them) on broken copies of the
    phantom folder; nothing is trained, no run folder is made."""
    root = workdir / "bad"
    root.mkdir()

    def attempt(cases: Path, named: Path, problem: str, config: str = "tiny") -> None:
        out = root / cases.name / "heads.pt"
        code = heads_cli.main(["--weights", str(tiny_ckpt), "--config", config, "--cases", str(cases),
                               "--out", str(out), "--epochs", "1"])
        assert not out.with_name("heads.run").exists(), "bad input must stop before training starts"
        _one_line_error(code, capsys.readouterr().err, named, problem)

    def copy(name: str) -> Path:
        target = root / name
        shutil.copytree(three_cases, target)
        return target

    ids = sorted(p.stem for p in (three_cases / IMAGES_DIR).glob("*.mha"))

    wider = root / "wider.json"
    config = load_config("tiny")
    config["vision_cfg"]["width"] = 128
    wider.write_text(json.dumps(config))
    attempt(three_cases, tiny_ckpt, "expects a ViT with width 128", config=str(wider))

    no_mask = copy("no_mask")
    (no_mask / MASKS_DIR / f"{ids[0]}.mha").unlink()
    attempt(no_mask, no_mask / MASKS_DIR / f"{ids[0]}.mha", "no mask stack")

    mismatch = copy("mismatch")
    mask_path = mismatch / MASKS_DIR / f"{ids[1]}.mha"
    write_mha(read_mha(mask_path)[:-1], mask_path)
    attempt(mismatch, mask_path, "does not match its image stack")

    short_csv = copy("short_csv")
    rows = [r for r in csv.reader((short_csv / CSV_PATH).open()) if r[0] != ids[2]]
    with (short_csv / CSV_PATH).open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    attempt(short_csv, short_csv / CSV_PATH, f"lacks 1 case(s) of the folder ({ids[2]})")

    single = copy("single")
    for case in ids[1:]:
        (single / IMAGES_DIR / f"{case}.mha").unlink()
        (single / MASKS_DIR / f"{case}.mha").unlink()
    attempt(single, single, "leave the training split empty")

    empty_masks = copy("empty_masks")
    for case in ids:
        path = empty_masks / MASKS_DIR / f"{case}.mha"
        write_mha(np.zeros_like(read_mha(path)), path)
    attempt(empty_masks, empty_masks / MASKS_DIR, "no abdomen mask in any training case")


# --------------------------------------------------------------------------- learning, resume, pipeline


@pytest.fixture(scope="module")
def learner(workdir: Path) -> tuple[Path, str]:
    """The learning check's backbone at random weights, and its config file."""
    config = workdir / "learner.json"
    config.write_text(json.dumps(LEARNER))
    torch.manual_seed(0)
    path = workdir / "learner.pt"
    torch.save({"state_dict": build_model(load_config(str(config))).state_dict()}, path)
    return path, str(config)


@pytest.fixture(scope="module")
def pretrained(workdir: Path, learner: tuple[Path, str]) -> Path:
    """A small backbone pretrained on phantoms: the learner trained whole (--train-backbone, the
    from-scratch mode) on cases of seeds never used below. Many subjects, few frames each: 6 cases of 40
    frames a sweep overfitted their subjects."""
    cases = make_phantoms(workdir / "pretrain_cases", 24, PRETRAIN_SEED, 20)
    out = workdir / "pretrain" / "heads.pt"
    weights, config = learner
    run(HeadsOptions(weights=weights, config=config, cases=cases, out=out, epochs=6, batch=8, lr=2e-3,
                     mask_channels=32, samples_per_epoch=800, train_backbone=True, threads=2), "pretrain")
    return out.with_name("heads.weights.pt")


@pytest.fixture(scope="module")
def resumed(workdir: Path, pretrained: Path, learner: tuple[Path, str]
            ) -> tuple[Path, Path, subprocess.CompletedProcess, dict]:
    """Fresh heads (LoRA) on the pretrained backbone through the CLI, killed (SIGKILL) once its first
    epoch's checkpoint is written, then resumed to the end."""
    cases = make_phantoms(workdir / "heads_cases", 5, HEADS_SEED, 40)
    heads = workdir / "fresh" / "heads.pt"
    args = [sys.executable, str(TRAIN_HEADS), "--weights", str(pretrained), "--config", learner[1], "--cases",
            str(cases), "--out", str(heads), "--epochs", "2", "--samples-per-epoch", "400", *SMALL]
    checkpoint = heads.with_name("heads.run") / "checkpoint.pt"
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be interrupted"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1 and not heads.exists()
    result = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((heads.with_name("heads.run") / "metrics.json").read_text())
    return heads, cases, result, metrics


@pytest.mark.timeout(1500)  # the module's pretraining and heads training land here
def test_an_interrupted_run_resumes_from_its_last_checkpoint(resumed) -> None:
    heads, _, result, metrics = resumed
    assert "resuming after epoch 1" in result.stdout
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    assert metrics["history"][0]["train_loss"]  # epoch 1 kept from before the interruption
    assert load_heads(heads).lora is not None


def _best_validation(metrics: dict) -> dict:
    return metrics["history"][metrics["best"]["epoch"] - 1]["validation"]


@pytest.mark.timeout(1500)  # the module's pretraining and heads training land here
def test_a_fresh_mask_head_on_a_phantom_backbone_learns(resumed) -> None:
    """Held-out subjects (phantom cases never trained on, by the heads or the backbone). Chance is the
    Dice of a mask covering the whole input (0.13 here); the check asks for three times that and at least
    0.45. Measured when these settings were chosen: 0.52."""
    _, cases, _, metrics = resumed
    best = _best_validation(metrics)
    chance_dice = whole_input_dice(cases, metrics)
    assert best["dice_positive"] >= max(0.45, 3 * chance_dice), (best, chance_dice)
    print(f"\nlearning check: Dice {best['dice_positive']:.3f} (whole-input mask {chance_dice:.3f}), SEG F1 "
          f"{best['seg_f1']:.3f}")


@pytest.mark.timeout(1500)  # the module's pretraining and heads training land here
@pytest.mark.xfail(strict=True, reason=(
    "issue 14's phantom: a quarter of the frames show the abdomen, so twice the all-positive F1 is 0.77; the "
    "learner pretrained here in CI's time reaches 0.44 (0.45 after twice the pretraining): the quality check "
    "needs a backbone that knows the phantom better"))
def test_a_fresh_quality_head_on_a_phantom_backbone_learns(resumed) -> None:
    """Chance is what a head that knows nothing but the class balance reaches: the quality F1 of calling
    every frame positive (2p / (1 + p), p the share of positive frames). The check asks for twice that
    and at least 0.4."""
    _, _, _, metrics = resumed
    best = _best_validation(metrics)
    p = best["positive_frames"] / best["frames"]
    chance_f1 = 2 * p / (1 + p)
    assert best["quality_f1"] >= max(0.4, 2 * chance_f1), (best, chance_f1)


def whole_input_dice(cases: Path, metrics: dict) -> float:
    """Mean Dice of an all-ones mask on the labelled frames of the validation cases, at model resolution."""
    letterbox = Letterbox(**metrics["letterbox"])
    scores = []
    for case in metrics["data"]["validation_ids"]:
        for frame in read_mha(cases / MASKS_DIR / f"{case}.mha"):
            if frame.any():
                truth = letterbox((frame > 0).astype(np.uint8) * 255).pixels >= 128
                scores.append(2 * truth.sum() / (truth.size + truth.sum()))
    return float(np.mean(scores))


@pytest.mark.timeout(1500)  # the module's pretraining and heads training land here
def test_the_trained_bundle_gives_best_frames_and_biometry_live(workdir: Path, pretrained: Path,
                                                                learner: tuple[Path, str], resumed) -> None:
    heads = resumed[0]
    bundle = workdir / "fresh" / "bundle"
    result = tool(BUILD_BUNDLE, "--weights", str(pretrained), "--config", learner[1], "--heads", str(heads),
                  "--out", str(bundle), "--check-frames", "2")
    assert result.returncode == 0, result.stderr
    out = workdir / "fresh" / "live"
    seed, frames = 5, 40
    run_result = run_pipeline("--bundle", str(bundle), "--source", f"phantom://{seed}?frames={frames}",
                              "--out", str(out), "--set", "transport.policy=lossless", timeout=300)
    assert run_result.returncode == 0, run_result.stderr
    finals = [e for e in read_journal(out, "best_frame") if e["final"]]
    assert len(finals) == 6
    picked = [e for e in finals if e["frame_id"] is not None]
    assert picked, "no sweep got a best frame"
    biometry = read_journal(out, "biometry")
    assert biometry and {e["frame_id"] for e in biometry} <= {e["frame_id"] for e in read_journal(out,
                                                                                                 "best_frame")}
    label = {e["frame_id"]: e["source"]["gt_label"] for e in read_journal(out, "frame")}
    assert len(label) == 6 * frames
    # The picks show the abdomen more often than the case's frames do.
    shown = np.mean([label[e["frame_id"]] > 0 for e in picked])
    base = np.mean([value > 0 for value in label.values()])
    assert shown > base, (shown, base)


# --------------------------------------------------------------------------- the real architecture


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vit_l_trains_two_steps_with_lora_on_cpu(three_cases: Path) -> None:
    """FetalCLIP's ViT-L/14 (random weights): LoRA on the IQA targets of all 24 blocks, the decoder on
    blocks 6, 8, 12 and 24, two steps at batch 2; prints the CPU step time."""
    torch.manual_seed(0)
    clip = build_model(load_config("fetalclip"))
    opts = HeadsOptions(weights=Path("unused"), cases=three_cases, out=Path("unused"))
    quality, mask = build_heads(clip, opts)
    assert mask.blocks == (5, 7, 11, 23) and mask.grid == 16 and mask.width == 1024
    assert quality.in_features == 768
    clip.requires_grad_(False)
    names = lora_parameter_names(clip, opts.lora_targets)
    assert len(names) == 3 * 24
    lora = attach_lora(clip, fresh_lora(clip, names, 8, 16.0))
    model = HeadsModel(clip, quality, mask, (0.5,) * 3, (0.25,) * 3)
    params = list(trainable(model).values())
    lora_count = sum(d.A.numel() + d.B.numel() for d in lora.values())
    assert sum(p.numel() for p in params) == lora_count + sum(
        p.numel() for p in [*quality.parameters(), *mask.parameters()])
    base = clip.visual.transformer.resblocks[3].mlp.c_fc.parametrizations.weight.original.clone()
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (2, 224, 224), dtype=np.uint8))
    masks = torch.zeros(2, 224, 224, dtype=torch.uint8)
    masks[0, 80:150, 60:170] = 255
    labels = torch.tensor([1, 0])
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        parts = losses(model, images, masks, labels, autocast=False)
        optimizer_step(optimizer, sum(parts.values()), 3e-4, params)
        seconds.append(time.perf_counter() - started)
        assert all(torch.isfinite(v) for v in parts.values())
    with torch.no_grad():
        q, m = model(images)
    assert q.shape == (2,) and m.shape == (2, 224, 224)
    assert all(d.B.abs().sum() > 0 for d in lora.values()), "every LoRA B left zero"
    assert torch.equal(base, clip.visual.transformer.resblocks[3].mlp.c_fc.parametrizations.weight.original)
    print(f"\nViT-L/14 + LoRA + heads, batch 2 on CPU ({torch.get_num_threads()} threads): steps "
          f"{', '.join(f'{s:.1f}' for s in seconds)} s")
    path = three_cases.parent / "vit_l_heads.pt"
    save_heads(path, quality=quality, mask=mask,
               lora={n: {"A": d.A, "B": d.B, "alpha": 16.0} for n, d in lora.items()})
    assert len(load_heads(path).lora) == 72
