"""One CLI grammar: every subcommand, common flags before the command, after it and after its
action, against one real daemon that bound an address other than 127.0.0.1 (commands find it
from its status.json). Run in-process through swarmd.cli.main (the same code `swarmd` runs) so
the table stays quick; a few rows also run as real processes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from swarmd.cli import main
from tests.conftest import run_cli

HOST = "127.0.0.2"  # a loopback address the daemon binds alone: 127.0.0.1 finds nothing there


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.conftest import Daemon

    d = tmp_path_factory.mktemp("node")
    daemon = Daemon("--role", "store", "--host", HOST, "--data-dir", str(d))
    try:
        ready = daemon.wait_event("ready", timeout=120)
        (d / "things" / "books").mkdir(parents=True)
        yield {"dir": d, "key": ready["public_key"], "dht": f"{HOST}:{ready['ports']['dht']}"}
    finally:
        daemon.stop()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def positions(words: list[str], rest: list[str], flags: list[str]) -> list[list[str]]:
    """The same command with the flags before it, after the command word, and at the end."""
    variants = [flags + words + rest, words + rest + flags]
    if len(words) > 1:
        variants.append(words[:1] + flags + words[1:] + rest)
    return variants


# (command words, other args, json output comparable across runs)
TABLE: list[tuple[list[str], list[str], bool]] = [
    (["identity"], [], True),
    (["keys", "ls"], [], True),
    (["things", "services"], [], True),
    (["status"], ["--timeout", "20"], False),
    (["peers"], ["--timeout", "20"], False),
    (["nat", "status"], ["--timeout", "20"], False),
    (["call"], ["{key}", "ping", "--timeout", "20"], True),
    (["call"], ["{key}", "--list", "--timeout", "20"], True),
    (["model", "ls"], ["--timeout", "20"], True),
    (["grant"], ["worker", "{key}", "--expires", "1h"], False),
]


@pytest.mark.parametrize("words,rest,stable", TABLE, ids=[" ".join(w + r[:2]) for w, r, _ in TABLE])
def test_common_flags_anywhere_mean_the_same(node, capsys, words, rest, stable) -> None:
    rest = [a.format(key=node["key"]) for a in rest]
    outs = []
    for argv in positions(words, rest, ["--data-dir", str(node["dir"]), "--json"]):
        code, out, err = cli(capsys, *argv)
        assert code == 0, f"{argv}: {err}"
        doc = json.loads(out)  # --json took effect wherever it stood
        outs.append(doc)
        if isinstance(doc, dict) and "public_key" in doc:
            assert doc["public_key"] == node["key"]  # the node of --data-dir, not the default dir's
    if stable:
        assert all(o == outs[0] for o in outs), outs


def test_commands_dial_the_address_the_node_bound(node, capsys) -> None:
    doc = json.loads((node["dir"] / "status.json").read_text())
    assert doc["host"] == HOST
    code, out, err = cli(capsys, "status", "--data-dir", str(node["dir"]), "--json")
    assert code == 0 and json.loads(out)["dht"]["address"][0] == HOST, err
    # --host names another address: the command dials that one (nothing listens on 127.0.0.1 here)
    code, out, err = cli(capsys, "peers", "--data-dir", str(node["dir"]), "--host", "127.0.0.1", "--timeout", "3")
    assert code == 1 and err.startswith("swarmd peers: ERR_"), err


def test_swarm_commands_find_the_swarm_through_the_local_node(node, capsys) -> None:
    """No --bootstrap: topic, call and model use the --data-dir node's DHT, never a silent default."""
    code, out, err = cli(capsys, "--data-dir", str(node["dir"]), "topic", "lookup", "swarmd/stores",
                         "--json", "--timeout", "10")
    assert code == 0, err
    assert node["key"] in {r["public_key"] for r in json.loads(out)}
    code, out, err = cli(capsys, "call", node["key"], "ping", "--bootstrap", node["dht"], "--data-dir",
                         str(node["dir"] / "elsewhere"), "--timeout", "20")
    assert code == 0 and json.loads(out) == "pong", err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--rol", "worker"], "unknown flag --rol (flags are never abbreviated; did you mean --role?)"),
        (["status", "--data-d", "x"],
         "unrecognized arguments: --data-d x (flags are never abbreviated; did you mean --data-dir?)"),
        (["keys", "ls", "--bootstrap", "127.0.0.1:1"], "--bootstrap does not apply to `swarmd keys ls`"),
        (["things", "services", "--host", "10.0.0.1"], "--host does not apply to `swarmd things services`"),
        (["completion", "bash", "--json"], "--json does not apply to `swarmd completion`"),
        (["--port", "7000", "status"], "--port applies to the daemon"),
        (["--role", "worker", "keys", "ls"], "--role applies to the daemon"),
        (["--json"], "--json applies to commands"),
    ],
)
def test_a_flag_that_does_not_apply_is_refused(capsys, tmp_path: Path, argv: list[str], needle: str) -> None:
    takes_dir = argv[0] not in ("--json", "completion")
    code, out, err = cli(capsys, *argv, *(["--data-dir", str(tmp_path)] if takes_dir else []))
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert err.startswith("swarmd") and ": ERR_BAD_REQUEST: " in err
    assert not (tmp_path / "identity.key").exists()


def test_one_error_line_format_for_every_command(capsys, tmp_path: Path) -> None:
    empty = str(tmp_path)
    for argv, prefix in [
        (["status"], "swarmd status: ERR_NOT_FOUND: no running node found in " + empty),
        (["peers"], "swarmd peers: ERR_NOT_FOUND: "),
        (["nat", "status"], "swarmd nat status: ERR_NOT_FOUND: "),
        (["topic", "lookup", "x"], "swarmd topic: ERR_BAD_REQUEST: no swarm to ask"),
        (["call", "11" * 32, "ping"], "swarmd call: ERR_BAD_REQUEST: no swarm to ask"),
        (["model", "ls"], "swarmd model ls: ERR_UNAVAILABLE: no store to talk to"),
        (["keys", "revoke", "nope"], "swarmd keys revoke: ERR_NOT_FOUND: "),
        (["things", "list", "nope"], "swarmd things list: ERR_NOT_FOUND: "),
    ]:
        code, out, err = cli(capsys, *argv, "--data-dir", empty)
        assert code == 1 and err.startswith(prefix) and len(err.splitlines()) == 1, (argv, err)


def test_model_pull_paths(node, capsys, tmp_path: Path) -> None:
    from tests.models import fixed_shape_model

    src = tmp_path / "m.onnx"
    src.write_bytes(fixed_shape_model())
    d = ["--data-dir", str(node["dir"])]
    code, out, err = cli(capsys, "model", "push", str(src), "--name", "pathy", *d)
    assert code == 0, err
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = cli(capsys, "model", "pull", "pathy", "-o", f"{out_dir}/", *d)
    assert code == 0, err
    assert [p.name for p in out_dir.iterdir()] == ["pathy-1.onnx"]
    assert (out_dir / "pathy-1.onnx").read_bytes() == src.read_bytes()
    code, out, err = cli(capsys, "model", "pull", "pathy:1", "-o", str(out_dir), *d, "--json")
    assert code == 0 and json.loads(out)["path"] == str(out_dir / "pathy-1.onnx"), err
    missing = tmp_path / "nope" / "x.onnx"
    code, out, err = cli(capsys, "model", "pull", "pathy", "-o", str(missing), *d)
    assert code == 1 and err == f"swarmd model pull: ERR_BAD_REQUEST: cannot write {missing}: directory " \
                                f"{missing.parent} does not exist\n"
    code, out, err = cli(capsys, "model", "pull", "pathy", "-o", f"{tmp_path / 'nodir'}/", *d)
    assert code == 1 and "does not exist" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out"]  # no .part beside anything


def test_real_processes_take_flags_after_nested_actions(node) -> None:
    r = run_cli("keys", "create", "--name", "ops", "--data-dir", str(node["dir"]))
    assert r.returncode == 0, r.stderr
    r = run_cli("--data-dir", str(node["dir"]), "keys", "ls")
    assert r.returncode == 0 and " ops " in r.stdout and "RATE/S" in r.stdout, r.stderr
    r = run_cli("nat", "status", "--data-dir", str(node["dir"]), "--timeout", "30")
    assert r.returncode == 0 and r.stdout.startswith("nat "), r.stderr
    r = run_cli("--rol", "worker")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_completion_offers_role_names(tmp_path: Path) -> None:
    r = run_cli("completion", "bash")
    script = tmp_path / "c.sh"
    script.write_text(r.stdout)
    probe = f"""source {script}
t() {{ COMP_WORDS=("$@"); COMP_CWORD=$((${{#COMP_WORDS[@]}}-1)); _swarmd; echo "${{COMPREPLY[*]}}"; }}
t swarmd --role w
t swarmd --role ""
"""
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    lines = out.stdout.splitlines()
    assert lines[0] == "worker" and set(lines[1].split()) == {
        "gateway", "orchestrator", "worker", "store", "relay", "bootstrap"}, out
