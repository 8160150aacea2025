"""Device tags and the system metrics sampler, with a fake NVML standing in for a GPU.

The CI machine has no GPU; a fake `pynvml` module exercises the same calls MLflow's GPU monitor
and `device_description` make on a real one.
"""

import subprocess
import sys
import time
import types

import pytest

from toolkit.tracking import SystemMetricsSampler, device_description, git_state

gpu_monitor = pytest.importorskip("mlflow.system_metrics.metrics.gpu_monitor")


class NVMLError(Exception):
    pass


def fake_nvml(names=("NVIDIA H100 80GB HBM3",)):
    calls = {"init": 0, "shutdown": 0}

    def init():
        calls["init"] += 1

    def shutdown():
        calls["shutdown"] += 1

    return types.SimpleNamespace(
        calls=calls,
        NVMLError=NVMLError,
        nvmlInit=init,
        nvmlShutdown=shutdown,
        nvmlDeviceGetCount=lambda: len(names),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: names[h],
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=20e9, total=80e9),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87),
        nvmlDeviceGetPowerUsage=lambda h: 350_000,  # milliwatts
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
    )


class RecordingClient:
    """Stands in for `MlflowClient`: records `log_batch` metrics."""

    def __init__(self):
        self.metrics = []

    def log_batch(self, run_id, metrics=(), synchronous=None):
        assert run_id == "run-1" and synchronous is True
        self.metrics.extend(metrics)


@pytest.fixture
def nvml(monkeypatch):
    fake = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(gpu_monitor, "pynvml", fake, raising=False)
    return fake


def test_device_description_names_gpus(nvml):
    assert device_description() == "NVIDIA H100 80GB HBM3"
    assert nvml.calls == {"init": 1, "shutdown": 1}


def test_device_description_without_gpu(monkeypatch):
    broken = fake_nvml()

    def no_driver():
        raise NVMLError("driver not loaded")

    broken.nvmlInit = no_driver
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert device_description() == "cpu"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert device_description() == "cpu"


def test_sampler_logs_cpu_memory_and_gpu_metrics(nvml):
    client = RecordingClient()
    sampler = SystemMetricsSampler(client, "run-1", interval=0.05, first_step=7).start()
    time.sleep(0.4)
    sampler.stop()
    by_key = {}
    for metric in client.metrics:
        by_key.setdefault(metric.key, []).append(metric)
    gpu = {
        "system/gpu_0_utilization_percentage": 87.0,
        "system/gpu_0_memory_usage_percentage": 25.0,
        "system/gpu_0_memory_usage_megabytes": 20_000.0,
        "system/gpu_0_power_usage_watts": 350.0,
        "system/gpu_0_power_usage_percentage": 50.0,
    }
    for key, value in gpu.items():
        assert [m.value for m in by_key[key]] == [value] * len(by_key[key]), key
    cpu = by_key["system/cpu_utilization_percentage"]
    assert len(cpu) >= 2  # periodic samples plus the final one from stop()
    steps = [m.step for m in cpu]
    assert steps == list(range(7, 7 + len(cpu)))
    assert all(0 <= m.value <= 100 for m in cpu)
    assert all(m.value > 0 for m in by_key["system/system_memory_usage_megabytes"])
    # Nothing is logged after stop().
    count = len(client.metrics)
    time.sleep(0.15)
    assert len(client.metrics) == count


def test_sampler_logs_a_sample_even_for_short_runs():
    client = RecordingClient()
    sampler = SystemMetricsSampler(client, "run-1", interval=60).start()
    sampler.stop()
    keys = {m.key for m in client.metrics}
    assert "system/cpu_utilization_percentage" in keys
    assert {m.step for m in client.metrics} == {0}


def test_sampler_rejects_bad_interval():
    with pytest.raises(ValueError, match="interval must be positive. Received: interval=0"):
        SystemMetricsSampler(RecordingClient(), "run-1", interval=0)


def test_git_state_reads_commit_and_dirty_flag(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert git_state(repo) == (head, False)
    (repo / "a.txt").write_text("changed")
    assert git_state(repo / "a.txt") == (head, True)
    assert git_state(tmp_path) == (None, None)
