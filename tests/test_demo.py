"""`buildbot-ec2-hybrid demo`, end to end in its short mode, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from buildbot_ec2_hybrid.sandbox.farm import free_port


def _processes_under(path: Path) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if str(path) in cmd or cwd.startswith(str(path)):
            found.append(f"{pid}: {cmd}")
    return found


def test_demo_short_mode_revives_builds_and_suspends(tmp_path):
    exe = Path(sys.executable).with_name("buildbot-ec2-hybrid")
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [str(exe), "demo", "--short", "--www-port", str(free_port()),
         "--workdir", str(workdir), "--duration", "240"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "demo succeeded: revived, built and suspended" in out
    assert "forbidden calls: none" in out
    # the narration shows each phase
    for phase in ("pending", "revived", "EC2 workers connected", "suspended"):
        assert phase in out
    # Ctrl-C / the end of the demo leaves no process behind
    assert _processes_under(workdir) == []
