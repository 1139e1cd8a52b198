"""The wheel carries every package folder: with setup.cfg's package_dir mapping, an unlisted subpackage imports
in an editable install and is silently missing from the wheel."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_every_module(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("mailroster-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for layer in ("daemon", "protocols", "backends"):
        for path in (ROOT / layer).rglob("*.py"):
            expected.add(f"mailroster/{layer}/{path.relative_to(ROOT / layer).as_posix()}")
    missing = expected - names
    assert not missing, f"missing from the wheel: {sorted(missing)}"
    assert "mailroster/__init__.py" not in names  # a namespace package, as the mapping requires
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mailroster = mailroster.daemon.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_every_code_folder_is_mapped_and_listed() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    mapping = dict(line.split("=", 1) for line in cfg["options"]["package_dir"].strip().splitlines() if "=" in line)
    mapping = {k.strip(): v.strip() for k, v in mapping.items()}
    packages = set(cfg["options"]["packages"].split())
    for folder in ("daemon", "protocols", "backends"):
        assert mapping[f"mailroster.{folder}"] == folder
        for sub in (ROOT / folder).rglob("__init__.py"):
            dotted = ".".join(("mailroster", *sub.parent.relative_to(ROOT).parts))
            assert dotted in packages, f"{dotted} is not listed in setup.cfg packages"
