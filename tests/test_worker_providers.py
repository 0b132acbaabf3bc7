"""Execution providers: which ones a worker asks onnxruntime for, and the CPU fallback."""

from __future__ import annotations

import pytest

import swarmd.worker.runtime as runtime
from swarmd.errors import ERR_INVALID_MODEL, ConfigError, SwarmdError
from swarmd.worker.config import WorkerConfig
from swarmd.worker.engine import InferenceEngine
from swarmd.worker.runtime import CPU, ModelRuntime, choose_providers
from tests.models import mlp_model

MLP = (4, 8, 3)
GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider", CPU]


@pytest.mark.parametrize(("wanted", "available", "chosen", "notes"), [
    ([], [CPU], [CPU], 0),
    ([], ["AzureExecutionProvider", CPU], [CPU], 0),  # a remote-call provider is never picked alone
    ([], GPU_BUILD, ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU], 0),
    ([], ["CUDAExecutionProvider", "OpenVINOExecutionProvider", CPU], ["CUDAExecutionProvider",
                                                                       "OpenVINOExecutionProvider", CPU], 0),
    (["CUDAExecutionProvider"], GPU_BUILD, ["CUDAExecutionProvider", CPU], 0),
    (["CUDAExecutionProvider"], [CPU], [CPU], 1),  # asked for, not installed: said, CPU serves
    ([CPU, "CUDAExecutionProvider"], GPU_BUILD, ["CUDAExecutionProvider", CPU], 0),  # CPU always last
    (["CUDAExecutionProvider", "CUDAExecutionProvider"], GPU_BUILD, ["CUDAExecutionProvider", CPU], 0),
])
def test_choose_providers(wanted, available, chosen, notes) -> None:
    got, why = choose_providers(wanted, available)
    assert got == chosen and len(why) == notes
    for sentence in why:
        assert "not available in this onnxruntime" in sentence and CPU in sentence


def test_the_installed_onnxruntime_runs_models_on_the_cpu() -> None:
    rt = ModelRuntime(mlp_model(MLP))
    assert rt.provider == CPU and rt.fallback is None and rt.notes == []
    rt = ModelRuntime(mlp_model(MLP), providers=["CUDAExecutionProvider"])
    assert rt.provider == CPU and "CUDAExecutionProvider is not available" in rt.notes[0]


class _GpuThatFails:
    """onnxruntime as a GPU build whose CUDA provider cannot start (no driver): sessions that
    ask for CUDA raise as onnxruntime does then; CPU sessions are real ones."""

    def __init__(self) -> None:
        import onnxruntime

        self.real = onnxruntime
        self.SessionOptions = onnxruntime.SessionOptions

    def get_available_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", CPU]

    def InferenceSession(self, model, opts, providers):  # noqa: N802 (onnxruntime's name)
        if providers != [CPU]:
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected\nmore lines")
        return self.real.InferenceSession(model, opts, providers=providers)


def test_a_model_that_fails_on_a_provider_falls_back_to_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(runtime, "_ort", _GpuThatFails)
    rt = ModelRuntime(mlp_model(MLP))
    assert rt.provider == CPU
    assert rt.fallback == (f"CUDAExecutionProvider could not load it (CUDA failure 100: no CUDA-capable device "
                           f"is detected); running on {CPU}")
    with pytest.raises(SwarmdError) as e:  # a broken model still fails, on the CPU too
        ModelRuntime(b"not onnx")
    assert e.value.code == ERR_INVALID_MODEL and "cannot load the model (8 bytes)" in e.value.message


async def test_the_worker_reports_the_provider_of_each_model() -> None:
    engine = InferenceEngine(WorkerConfig(providers=["CUDAExecutionProvider"]))
    try:
        await engine.load("mlp", "1", mlp_model(MLP))
        (desc,) = engine.describe_models()
        assert desc["provider"] == CPU and "provider_fallback" not in desc
    finally:
        await engine.close()


@pytest.mark.parametrize("bad", ["CUDA", ["cuda"], [1], "CUDAExecutionProvider"])
def test_providers_config_is_checked(bad) -> None:
    with pytest.raises(ConfigError, match="worker.providers must be a list"):
        WorkerConfig(providers=bad).validate()


def test_status_shows_the_provider_of_each_loaded_model(daemons, tmp_path) -> None:
    import json

    from tests.conftest import run_cli

    model = tmp_path / "m.onnx"
    model.write_bytes(mlp_model(MLP))
    conf = tmp_path / "swarmd.toml"
    conf.write_text(f'[worker]\nmodels = ["lin={model}"]\nproviders = ["CUDAExecutionProvider"]\n')
    d = daemons("--role", "worker", "--config", str(conf), "--data-dir", str(tmp_path / "w"))
    d.wait_event("ready")
    assert any('"event": "provider_unavailable"' in line for line in d.lines)
    r = run_cli("status", "--json", "--data-dir", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["providers"] == {"lin:1": CPU}
    assert d.stop() == 0
