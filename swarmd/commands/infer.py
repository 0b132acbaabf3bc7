"""`swarmd infer MODEL --input FILE`: run a model on the swarm from a JSON or .npy file.

Goes through the client library (swarmd_rpc.Client), so it routes like the
gateway: an orchestrator's choice of worker, failover to another. The swarm
is reached through --bootstrap, through the node of --data-dir when one is
running (its own DHT port), or one peer directly with --peer KEY@HOST:PORT.

Input files:
  .npy                  one array, fed to the input named by --input-name
  .npz                  one array per input, keyed by input name
  .json                 {"NAME": nested list, ...}, or {"NAME": {"data": [...], "dtype": "int64",
                        "shape": [2, 3]}}, or a bare nested list for --input-name
Lists become --dtype arrays (float32 by default).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarmd.errors import ERR_BAD_REQUEST, SwarmdError

if TYPE_CHECKING:
    import numpy as np

# numpy is imported inside the functions that use it: the CLI imports every command
# module to build its parser, and a bootstrap or relay daemon must not pay for numpy

NAME = "infer"
HELP = "run a model on the swarm with inputs from a .json, .npy or .npz file; print the outputs"
FLAGS = ("bootstrap", "data_dir", "host", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model name (NAME or NAME:VERSION)")
    parser.add_argument("--input", "-i", required=True, type=Path, metavar="FILE",
                        help="inputs: FILE.json, FILE.npy or FILE.npz")
    parser.add_argument("--input-name", default="input", help="input name for a .npy or a bare JSON list")
    parser.add_argument("--dtype", default="float32", help="dtype of JSON lists (default float32)")
    parser.add_argument("--version", default=None, help="model version (default: latest)")
    parser.add_argument("--output-format", choices=["text", "json"], default="text", help="json: same as --json")
    parser.add_argument("--peer", default=None, metavar="KEY@HOST:PORT",
                        help="send to this one worker or orchestrator instead of routing through the swarm")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds, failover included (default 30)")


def _array(value: Any, dtype: str, where: str) -> np.ndarray:
    import numpy as np

    try:
        with np.errstate(over="raise", invalid="raise"):
            arr = _convert(value, dtype)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"tensors are numbers or booleans, not {arr.dtype}")
        return arr
    except (FloatingPointError, OverflowError) as e:
        raise SwarmdError(ERR_BAD_REQUEST, f"{where}: a value does not fit {dtype}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise SwarmdError(ERR_BAD_REQUEST, f"{where}: cannot make a {dtype} array: {e}") from None


def _convert(value: Any, dtype: str) -> np.ndarray:
    import numpy as np

    if isinstance(value, dict):
        arr = np.asarray(value["data"], dtype=value.get("dtype", dtype))
        if "shape" in value:
            arr = arr.reshape(value["shape"])
        return arr
    return np.asarray(value, dtype=dtype)


def read_inputs(path: Path, input_name: str = "input", dtype: str = "float32") -> dict[str, np.ndarray]:
    """The input tensors in path (.json, .npy or .npz), by input name."""
    import numpy as np

    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return {input_name: np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix == ".json":
            doc = json.loads(path.read_text())
        else:
            raise SwarmdError(ERR_BAD_REQUEST, f"{path}: expected a .json, .npy or .npz file")
    except OSError as e:
        raise SwarmdError(ERR_BAD_REQUEST, f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise SwarmdError(ERR_BAD_REQUEST, f"{path} is not valid {suffix[1:]}: {e}") from None
    if isinstance(doc, list):
        return {input_name: _array(doc, dtype, str(path))}
    if isinstance(doc, dict) and doc:
        return {str(k): _array(v, dtype, f"{path} input {k!r}") for k, v in doc.items()}
    raise SwarmdError(ERR_BAD_REQUEST, f"{path}: expected a list or a non-empty object of input name to list")


def make_client(args: argparse.Namespace, *, timeout: float) -> Any:
    """A swarmd_rpc.Client configured from the common flags (--bootstrap, --data-dir, swarm secret)."""
    from swarmd.commands.reach import swarm_client
    from swarmd_rpc import Client, ClientConfig

    cfg = ClientConfig(timeout=timeout, infer_timeout=timeout)
    if getattr(args, "peer", None):
        from swarmd.settings import parse_peer

        key, host, port = parse_peer(args.peer, what="--peer")
        return Client.for_peer(key, host, port, config=cfg)
    return swarm_client(args, cfg)


def to_json(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: {"dtype": str(v.dtype), "shape": list(v.shape), "data": v.tolist()} for k, v in outputs.items()}


async def run(args: argparse.Namespace) -> int:
    import numpy as np

    from swarmd.store.transfer import parse_ref

    name, version = parse_ref(args.model)
    version = args.version or version
    inputs = read_inputs(args.input, args.input_name, args.dtype)
    async with make_client(args, timeout=args.timeout) as client:
        res = await client.infer_detailed(name, inputs, version, timeout=args.timeout)
    if args.json or args.output_format == "json":
        print(json.dumps({"model": res.model, "version": res.version, "worker": res.worker,
                          "outputs": to_json(res.outputs)}))
        return 0
    print(f"{res.model}:{res.version}  worker {res.worker[:16] if res.worker else '-'}", file=sys.stderr)
    with np.printoptions(threshold=200, edgeitems=4, precision=5, suppress=True):
        for k, v in res.outputs.items():
            print(f"{k} {v.dtype}{list(v.shape)}:\n{v}")
    return 0
