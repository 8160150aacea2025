"""What the run ran on: device and code tags, and system metrics sampled during training.

System metrics reuse MLflow's monitors (CPU and memory through psutil; GPU utilisation, memory
and power through nvidia-ml-py where an NVIDIA GPU is present). They are logged as
`system/<name>` metrics, one step per sample, by a background thread. Unlike MLflow's own
`log_system_metrics=True` monitor, the sampler also logs a final sample when it stops, so even
a run shorter than the sampling interval has system metrics.
"""

import logging
import subprocess
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SYSTEM_PREFIX = "system/"


def gpu_names():
    """Returns the names of the NVIDIA GPUs seen by nvidia-ml-py (`[]` without one)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU
        return []
    try:
        names = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return names
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def device_description():
    """Returns the `devices` tag: GPU names joined by `, ` (e.g. `NVIDIA H100`), else `cpu`."""
    names = gpu_names()
    return ", ".join(names) if names else "cpu"


def _git(args, cwd):
    try:
        result = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state(path=None):
    """Returns `(commit, dirty)` of the git repository holding `path`, or `(None, None)`.

    Args:
        path: str, path-like or None. A file or folder inside the repository. Defaults to the
            folder of the `toolkit` package, i.e. the code that is running.

    Returns:
        tuple of (str or None, bool or None).
    """
    if path is None:
        path = Path(__file__).resolve().parent
    path = Path(path)
    cwd = path if path.is_dir() else path.parent
    commit = _git(["rev-parse", "HEAD"], cwd)
    if not commit:
        return None, None
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return commit, bool(status)


def _monitors():
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    monitors = [CPUMonitor()]
    try:
        monitors.append(GPUMonitor())  # needs nvidia-ml-py and a working NVIDIA driver
    except Exception:
        logger.debug("No NVIDIA GPU monitor", exc_info=True)
    return monitors


class SystemMetricsSampler:
    """Samples CPU, memory and GPU metrics in a background thread and logs them to a run.

    Every `interval` seconds the thread collects one sample from each monitor and logs it as
    `system/<metric>` at the next step; `stop()` logs one last sample and waits for the thread.
    Logging errors are reported as warnings and never stop training.

    Args:
        client: `mlflow.MlflowClient`. Client of the run's tracking store.
        run_id: str. The run to log to.
        interval: float. Seconds between samples. Defaults to `10.0`.
        first_step: int. Step of the first sample (continue after the last one on resume).
            Defaults to `0`.
    """

    def __init__(self, client, run_id, interval=10.0, first_step=0):
        if interval <= 0:
            raise ValueError(f"interval must be positive. Received: interval={interval}")
        self.client = client
        self.run_id = run_id
        self.interval = float(interval)
        self.step = int(first_step)
        self.monitors = _monitors()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        # psutil.cpu_percent() measures since its previous call; prime it so the first sample
        # is a real measurement and not 0.
        self._collect_and_clear()

    @staticmethod
    def next_step(client, run_id):
        """Returns the step after the last `system/` metric of a run (0 if it has none)."""
        run = client.get_run(run_id)
        steps = [m.step for m in run.data._metric_objs if m.key.startswith(SYSTEM_PREFIX)]
        return max(steps) + 1 if steps else 0

    def _collect_and_clear(self):
        for monitor in self.monitors:
            monitor.clear_metrics()
            try:
                monitor.collect_metrics()
            except Exception:
                logger.debug("System metrics collection failed", exc_info=True)

    def sample(self):
        """Collects one sample and logs it synchronously; returns the logged `{key: value}`."""
        from mlflow.entities import Metric

        with self._lock:
            values = {}
            for monitor in self.monitors:
                monitor.clear_metrics()
                try:
                    monitor.collect_metrics()
                    values.update(monitor.aggregate_metrics())
                except Exception:
                    logger.debug("System metrics collection failed", exc_info=True)
            timestamp = int(time.time() * 1000)
            metrics = [
                Metric(SYSTEM_PREFIX + key, float(value), timestamp, self.step)
                for key, value in values.items()
            ]
            if metrics:
                try:
                    self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
                    self.step += 1
                except Exception as e:
                    logger.warning("Could not log system metrics: %s", e)
            return {m.key: m.value for m in metrics}

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self):
        """Starts the sampling thread."""
        self._thread = threading.Thread(target=self._loop, name="SystemMetricsSampler", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stops the thread and logs a final sample."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.sample()
