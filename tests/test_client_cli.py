"""The operator CLI over real daemons: infer (json, npy), status, completion, --json listings."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import run_cli
from tests.store_models import write_model


def test_infer_and_status_against_daemons(daemons, tmp_path: Path) -> None:
    a_dir, w_dir = tmp_path / "a", tmp_path / "w"
    a = daemons("--role", "bootstrap,store,orchestrator", "--data-dir", str(a_dir))
    ready = a.wait_event("ready")
    boot = f"127.0.0.1:{ready['ports']['dht']}"
    w = daemons("--role", "worker", "--bootstrap", boot, "--data-dir", str(w_dir))
    w.wait_event("ready")

    model = write_model(tmp_path / "m.onnx", seed=7)
    r = run_cli("model", "push", str(model), "--name", "lin", "--version", "1", "--data-dir", str(a_dir))
    assert r.returncode == 0, r.stderr

    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x})[0]
    out_name = sess.get_outputs()[0].name
    (tmp_path / "in.json").write_text(json.dumps({"x": x.tolist()}))
    np.save(tmp_path / "in.npy", x)

    r = run_cli("infer", "lin", "--input", str(tmp_path / "in.json"), "--output-format", "json",
                "--bootstrap", boot)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["version"] == "1"
    np.testing.assert_allclose(np.asarray(doc["outputs"][out_name]["data"], np.float32), want, rtol=1e-5)

    # .npy through the node of --data-dir (no --bootstrap): its DHT port comes from status.json
    r = run_cli("infer", "lin:1", "--input", str(tmp_path / "in.npy"), "--input-name", "x", "--json",
                "--data-dir", str(w_dir))
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.asarray(json.loads(r.stdout)["outputs"][out_name]["data"]), want, rtol=1e-5)

    r = run_cli("infer", "lin", "--input", str(tmp_path / "in.json"), "--bootstrap", boot)
    assert r.returncode == 0 and out_name in r.stdout, r.stderr

    # bad input: a precise error and exit 1, not a traceback
    (tmp_path / "bad.json").write_text(json.dumps({"x": [[1.0, 2.0]]}))
    r = run_cli("infer", "lin", "--input", str(tmp_path / "bad.json"), "--bootstrap", boot)
    assert r.returncode == 1 and "ERR_BAD_REQUEST" in r.stderr and "Traceback" not in r.stderr

    r = run_cli("status", "--json", "--data-dir", str(a_dir))
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert set(st["roles"]) == {"bootstrap", "store", "orchestrator"}
    assert [m["name"] for m in st["models"]] == ["lin"]
    assert len(st["workers"]) == 1 and st["workers"][0]["state"] == "ONLINE"
    assert "load" in st["workers"][0]
    r = run_cli("status", "--data-dir", str(w_dir))
    assert r.returncode == 0 and "roles    worker" in r.stdout, r.stderr

    assert a.stop() == 0 and w.stop() == 0


def test_status_without_a_node_says_so(tmp_path: Path) -> None:
    r = run_cli("status", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and "no running node" in r.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_is_valid_and_completes(shell: str, tmp_path: Path) -> None:
    r = run_cli("completion", shell)
    assert r.returncode == 0, r.stderr
    script = tmp_path / "c.sh"
    script.write_text(r.stdout)
    if shell == "zsh":
        assert r.stdout.startswith("#compdef swarmd")
        return
    probe = f"""source {script}
t() {{ COMP_WORDS=("$@"); COMP_CWORD=$((${{#COMP_WORDS[@]}}-1)); _swarmd; echo "${{COMPREPLY[*]}}"; }}
t swarmd mod
t swarmd --data-dir x model p
t swarmd model push --st
t swarmd --log-format j
"""
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.stdout.splitlines() == ["model", "pull push", "--store --store-key", "json"], out.stderr


def test_listing_commands_take_json(tmp_path: Path) -> None:
    """Every listing command accepts --json and prints one parseable document."""
    d = str(tmp_path)
    r = run_cli("keys", "--data-dir", d, "create", "--name", "ci", "--json")
    assert r.returncode == 0, r.stderr
    for argv in (["keys", "ls"], ["things", "services"], ["identity"]):
        r = run_cli(argv[0], "--data-dir", d, *argv[1:], "--json")
        assert r.returncode == 0, r.stderr
        json.loads(r.stdout)
    assert shutil.which("bash")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(doc=json_values)
def test_infer_input_files_fail_with_a_code_never_a_traceback(doc, tmp_path_factory) -> None:
    from swarmd.commands.infer import read_inputs
    from swarmd.errors import ERR_BAD_REQUEST, SwarmdError

    path = tmp_path_factory.mktemp("in") / "in.json"
    path.write_text(json.dumps(doc))
    try:
        out = read_inputs(path)
    except SwarmdError as e:
        assert e.code == ERR_BAD_REQUEST and e.message
        return
    assert out and all(isinstance(v, np.ndarray) for v in out.values())
