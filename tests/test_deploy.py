"""deploy/swarmd.service is a unit systemd accepts, and it runs the daemon the way the docs say."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "swarmd.service"


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    assert tool is not None, "systemd-analyze is missing: .ci/run installs the systemd package"
    text = UNIT.read_text()
    # verify checks that ExecStart's program exists: point it at this environment's swarmd
    swarmd = Path(sys.executable).parent / "swarmd"
    assert "ExecStart=/opt/swarmd/bin/swarmd " in text
    (tmp_path / "swarmd.service").write_text(text.replace("/opt/swarmd/bin/swarmd", str(swarmd)))
    r = subprocess.run([tool, "verify", str(tmp_path / "swarmd.service")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "swarmd.service" not in r.stderr, r.stderr


def test_unit_file_has_restart_state_and_hardening() -> None:
    keys = {line.split("=", 1)[0] for line in UNIT.read_text().splitlines() if "=" in line and line[0] != "#"}
    assert {"Restart", "StateDirectory", "DynamicUser", "NoNewPrivileges", "ProtectSystem", "ProtectHome",
            "PrivateTmp", "RestrictAddressFamilies", "SystemCallFilter", "CapabilityBoundingSet"} <= keys
    ops = (ROOT / "docs" / "operations.md").read_text()
    assert "deploy/swarmd.service" in ops and "systemctl stop swarmd" in ops
