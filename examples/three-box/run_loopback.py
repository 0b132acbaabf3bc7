"""Run the commands of examples/three-box/README.md on this machine, on 127.0.0.1.

    python examples/three-box/run_loopback.py

Reads every ```sh block that follows a `<!-- box: NAME -->` marker in the
README and runs its lines with bash, in README order, exactly as written,
except the `env` block (box addresses), which becomes 127.0.0.1 for every
box. `$HOME` is a scratch directory, so `~/swarmd-a` etc. land there.
`swarmd --role ...` lines are daemons: started in the background and waited
on until ready; every other line must exit 0. The daemons are stopped by PID
at the end. The last line printed is a JSON summary (the test reads it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # examples/swarmlab.py

from swarmlab import ROOT, Daemon, wait_until  # noqa: E402

BLOCK = re.compile(r"<!-- box: (?P<box>[\w-]+) -->\s*```sh\n(?P<body>.*?)```", re.S)


def blocks(readme: str) -> list[tuple[str, list[str]]]:
    """(box, command lines) in README order; backslash continuations joined, blank lines dropped."""
    out = []
    for m in BLOCK.finditer(readme):
        text = m.group("body").replace("\\\n", " ")
        out.append((m.group("box"), [ln.strip() for ln in text.splitlines() if ln.strip()]))
    return out


def main() -> None:
    steps = blocks((HERE / "README.md").read_text())
    with tempfile.TemporaryDirectory(prefix="swarmd-three-box-") as tmp:
        home = Path(tmp)
        bindir = home / "bin"
        bindir.mkdir()
        # `swarmd` and `python` on PATH mean this checkout and this interpreter
        for name, cmd in (("swarmd", f'"{sys.executable}" -m swarmd'), ("python", f'"{sys.executable}"')):
            (bindir / name).write_text(f'#!/bin/sh\nexec {cmd} "$@"\n')
            (bindir / name).chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWARMD_")}
        env.update(HOME=str(home), PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
                   PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
        daemons: list[Daemon] = []
        outputs: dict[str, str] = {}
        try:
            for box, lines in steps:
                if box == "env":
                    env.update(A="127.0.0.1", B="127.0.0.1", C="127.0.0.1", D="127.0.0.1")
                    print(f"[env] every box address is 127.0.0.1 (instead of: {lines[0]})")
                    continue
                for line in lines:
                    print(f"[{box}] $ {line}", flush=True)
                    if line.startswith("swarmd --role"):
                        d = Daemon.from_shell(line, box, env=env, cwd=home)
                        daemons.append(d)
                        ready = d.wait_ready()
                        print(f"[{box}] ready: pid {d.pid}, ports {ready['ports']}", flush=True)
                        continue

                    def attempt(line: str = line) -> subprocess.CompletedProcess[str] | None:
                        r = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env,
                                           cwd=home, timeout=120)
                        return r if r.returncode == 0 else None

                    # the first inference may wait for records to spread and a worker to fetch the model
                    retry = line.startswith(("swarmd infer", "curl", "swarmd model"))
                    r = wait_until(attempt, 60, what=line) if retry else attempt()
                    if r is None:
                        r = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, cwd=home)
                        raise RuntimeError(f"[{box}] `{line}` failed ({r.returncode}): {r.stderr.strip()}")
                    outputs[line.split()[0] + " " + line.split()[1]] = r.stdout
                    if r.stdout.strip() and not line.endswith("> ~/ops.key"):
                        print("\n".join("    " + ln for ln in r.stdout.strip().splitlines()[:12]), flush=True)
        finally:
            for d in reversed(daemons):
                print(f"[{d.name}] stopping pid {d.pid}: exit {d.stop()}", flush=True)
        labels_cli = json.loads(outputs["swarmd infer"])["outputs"]["label"]["data"]
        http = json.loads(outputs["curl -sf"])
        labels_http = next(o["data"] for o in http["outputs"] if o["name"] == "label")
    print(json.dumps({"boxes": sum(1 for b, _ in steps if len(b) == 1), "cli_labels": labels_cli,
                      "http_labels": labels_http}))


if __name__ == "__main__":
    main()
