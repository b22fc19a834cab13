"""`tools/list_devices.py`: the V4L2 capture devices on this machine, with their driver name and the pixel
formats, sizes and rates each offers (from FFmpeg's v4l2 input), to choose a `v4l2://` source."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

SYSFS = Path("/sys/class/video4linux")
LIST_TIMEOUT_S = 10.0


def devices(root: Path = Path("/dev")) -> list[Path]:
    return sorted(root.glob("video*"), key=lambda p: (len(p.name), p.name))


def device_name(device: Path) -> str:
    name = SYSFS / device.name / "name"
    return name.read_text().strip() if name.is_file() else "unknown"


def formats(device: Path) -> list[str]:
    """FFmpeg's list of the device's formats ('Raw : yuyv422 : YUYV 4:2:2 : 1920x1080 1280x720' lines)."""
    if shutil.which("ffmpeg") is None:
        return ["(install ffmpeg to list formats)"]
    command = ["ffmpeg", "-hide_banner", "-f", "v4l2", "-list_formats", "all", "-i", str(device)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=LIST_TIMEOUT_S)
    lines = [line.split("]", 1)[-1].strip() for line in result.stderr.splitlines()
             if "Raw" in line or "Compressed" in line]
    return lines or [result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no formats"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args(argv)
    found = devices()
    if not found:
        print("no V4L2 devices (/dev/video*) on this machine")
        return 0
    for device in found:
        print(f"{device}  {device_name(device)}")
        for line in formats(device):
            print(f"    {line}")
    return 0
