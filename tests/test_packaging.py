"""The package builds cleanly and carries every Hydra config."""

import subprocess
import sys
import zipfile

from conftest import REPO_ROOT


def test_wheel_builds_without_setuptools_warnings_and_ships_all_configs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-v", "-w", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    for warning in ("absent from the `packages`", "as data is deprecated", "Deprecat"):
        assert warning not in log, warning
    (wheel,) = tmp_path.glob("lepton_flwr-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    expected = {
        "lepton_flwr/conf/" + str(p.relative_to(REPO_ROOT / "conf"))
        for p in (REPO_ROOT / "conf").rglob("*.yaml")
    }
    assert shipped == expected
