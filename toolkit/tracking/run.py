"""One MLflow run per training: start or resume it, tag it, log to it, and close it with a status.

```python
from toolkit.tracking import tracking_run

with tracking_run(pipeline="asr", config=cfg, out_dir=out, tracking_uri=None) as tracker:
    model.fit(..., initial_epoch=start, callbacks=[tracker.callback(image_fn=plot), ckpt])
    tracker.log_metrics({"test_cer": cer})
```

`tracking_run` checks that the store is reachable (a `UserError` naming the URI, before any
training), starts a run in the pipeline's experiment, or continues the run whose id is saved in
`<out_dir>/mlflow_run_id`, logs the flattened config, the config file and tags, samples system
metrics, and marks the run FINISHED, FAILED (an exception) or KILLED (Ctrl-C, SIGTERM) on exit.
With `enabled=False` (the pipelines' `tracking=off`) nothing is imported or logged and the
callback does nothing.
"""

import json
import logging
import os
import re
import signal
import tempfile
import threading
import time
from pathlib import Path

from toolkit.errors import UserError
from toolkit.tracking import store
from toolkit.tracking.callback import MlflowCallback
from toolkit.tracking.params import config_to_dict, to_mlflow_params
from toolkit.tracking.system import SystemMetricsSampler, device_description, git_state

logger = logging.getLogger(__name__)

RUN_ID_FILENAME = "mlflow_run_id"
MODEL_ARTIFACT = "model"
CONFIG_ARTIFACT = "config.yaml"
METRICS_FILENAME = "metrics.json"

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"

# Makes the MLflow UI open the experiment in its "Model training" layout (runs table, metric
# charts) instead of the GenAI one (traces, judges).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

_IMAGE_FILE = re.compile(r"^(?P<key>.+?)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%]")
_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")


def make_run_name(pipeline, what=None, when=None):
    """Returns a run name that says what ran: `asr-transformer-20261121-1130`.

    Args:
        pipeline: str. Pipeline name.
        what: str or None. The model or variant. Defaults to `None`.
        when: `time.struct_time` or None. Defaults to now (local time).

    Returns:
        str.
    """
    stamp = time.strftime("%Y%m%d-%H%M", when or time.localtime())
    return "-".join(str(part) for part in (pipeline, what, stamp) if part)


def _guess_variant(config):
    # Names a run after the model it trains, when the config says so.
    for path in (("model", "name"), ("model", "type"), ("model", "architecture"), ("name",)):
        value = config
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str) and value:
            return value
    return None


def _to_pil(image):
    """Converts a matplotlib Figure, a NumPy array or a PIL image for `log_image`."""
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        Figure = ()
    if isinstance(image, Figure):
        import io

        import PIL.Image

        buffer = io.BytesIO()
        image.savefig(buffer, format="png", dpi=image.dpi, bbox_inches="tight")
        buffer.seek(0)
        pil = PIL.Image.open(buffer)
        pil.load()
        try:
            import matplotlib.pyplot as plt

            plt.close(image)
        except Exception:
            pass
        return pil
    return image


def _metric_key(key):
    return _METRIC_KEY_BAD.sub("_", str(key))


def _atomic_write(path, text):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Tracker:
    """An MLflow run for one training, used as a context manager (see `tracking_run`).

    Args:
        pipeline: str. Pipeline name: the experiment name and the registered model name.
        config: dict, dataclass or object with `to_dict()`. The resolved configuration; logged
            flattened as parameters and as `config.yaml` (unless `config_path` is given).
        out_dir: str or path-like. The run's output folder; holds `mlflow_run_id` (for resume)
            and `metrics.json` (logged at the end when present).
        tracking_uri: str or None. Tracking URI; `None` uses `MLFLOW_TRACKING_URI`, else the
            default store (`toolkit.tracking.default_tracking_uri()`). Defaults to `None`.
        enabled: bool or str. `False`/`"off"` disables tracking. Defaults to `True`.
        run_name: str or None. Defaults to `make_run_name(pipeline, config's model name)`.
        config_path: str, path-like or None. The resolved config file to log as an artifact.
            Defaults to `None` (the config is written as `config.yaml`).
        data_fingerprint: str or None. Logged as the `data_fingerprint` tag (see
            `toolkit.tracking.data_fingerprint`). Defaults to `None`.
        tags: dict or None. Extra tags. Defaults to `None`.
        registered_model_name: str or None. Defaults to `pipeline`.
        system_metrics: bool. Sample system metrics during the run. Defaults to `True`.
        system_metrics_interval: float. Seconds between samples. Defaults to `10.0`.
        check_timeout: float. Seconds to wait for a tracking server to answer. Defaults to `5.0`.
        handle_sigterm: bool. While the run is open (main thread only), turn SIGTERM into
            `KeyboardInterrupt` so the run ends as KILLED, unless a Python handler is already
            installed for SIGTERM (the pipelines' CLI installs one that raises). Defaults to
            `True`.
    """

    def __init__(
        self,
        pipeline,
        config,
        out_dir,
        tracking_uri=None,
        enabled=True,
        run_name=None,
        config_path=None,
        data_fingerprint=None,
        tags=None,
        registered_model_name=None,
        system_metrics=True,
        system_metrics_interval=10.0,
        check_timeout=5.0,
        handle_sigterm=True,
    ):
        if not pipeline or not isinstance(pipeline, str):
            raise ValueError(
                f"pipeline must be a non-empty string. Received: pipeline={pipeline!r}"
            )
        self.pipeline = pipeline
        self.config = config_to_dict(config)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.enabled = store.parse_tracking_setting(enabled)
        self.tracking_uri = store.resolve_tracking_uri(tracking_uri) if self.enabled else None
        self.experiment_name = pipeline
        self.run_name = run_name or make_run_name(pipeline, _guess_variant(self.config))
        self.config_path = Path(config_path) if config_path is not None else None
        self.data_fingerprint = data_fingerprint
        self.extra_tags = dict(tags or {})
        self.registered_model_name = registered_model_name or pipeline
        self.system_metrics = system_metrics
        self.system_metrics_interval = system_metrics_interval
        self.check_timeout = check_timeout
        self.handle_sigterm = handle_sigterm

        self.run_id = None
        self.experiment_id = None
        self.resumed = False
        self.status = None
        self.model_info = None
        self.model_version = None
        self._client = None
        self._sampler = None
        self._requested_status = None
        self._saved_uris = None
        self._previous_sigterm = None
        self._logged_steps = None  # {metric key: set of steps}, loaded on first use
        self._logged_images = None  # {(image key, step)}
        self._active = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            status = self._requested_status or FINISHED
        elif issubclass(exc_type, KeyboardInterrupt):
            status = KILLED
        elif issubclass(exc_type, SystemExit):
            status = FINISHED if exc.code in (0, None) else KILLED
            status = self._requested_status or status
        else:
            status = FAILED
        self.end(status)
        return False

    @property
    def run_id_file(self):
        """`<out_dir>/mlflow_run_id`, or `None` without an output folder."""
        return self.out_dir / RUN_ID_FILENAME if self.out_dir is not None else None

    def start(self):
        """Checks the store, starts or resumes the run, logs params, tags and config.

        Raises:
            UserError: the tracking store is unreachable or unusable.
        """
        if not self.enabled or self._active:
            return self
        if self.config_path is not None and not self.config_path.is_file():
            raise UserError(f"config file {self.config_path} does not exist")
        store.check_tracking_uri(self.tracking_uri, timeout=self.check_timeout)

        import mlflow
        from mlflow.exceptions import MlflowException

        self._set_global_uris()
        try:
            with store.creation_lock(self.tracking_uri):
                self._client = mlflow.MlflowClient(self.tracking_uri, self._registry_uri())
                self.experiment_id = self._experiment_id()  # creates the tracking tables
                if store.sqlite_path(self._registry_uri()) is not None:
                    self._client.search_registered_models(max_results=1)  # registry tables
            previous = self._previous_run()
            if previous is not None:
                mlflow.start_run(run_id=previous, log_system_metrics=False)
                self.run_id = previous
                self.resumed = True
                self.run_name = self._client.get_run(previous).info.run_name
                logger.info("Resuming MLflow run %s (%s)", self.run_name, previous)
            else:
                active = mlflow.start_run(
                    experiment_id=self.experiment_id,
                    run_name=self.run_name,
                    log_system_metrics=False,
                )
                self.run_id = active.info.run_id
        except MlflowException as e:
            self._restore_global_uris()
            first_line = str(e.message).strip().splitlines()[0] if str(e.message) else repr(e)
            raise UserError(f"tracking store {self.tracking_uri}: {first_line}") from None
        except BaseException:
            self._restore_global_uris()
            raise
        self._active = True
        try:
            if self.run_id_file is not None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                _atomic_write(self.run_id_file, self.run_id + "\n")
            self.set_tags(self._default_tags())
            self._log_params()
            self._log_config()
            if self.system_metrics:
                first = SystemMetricsSampler.next_step(self._client, self.run_id)
                self._sampler = SystemMetricsSampler(
                    self._client, self.run_id, self.system_metrics_interval, first_step=first
                ).start()
            self._install_sigterm()
        except BaseException:
            self.end(FAILED)
            raise
        return self

    def end(self, status=FINISHED):
        """Stops system metrics, logs `metrics.json` if present, and ends the run with `status`.

        Args:
            status: str. `"FINISHED"`, `"FAILED"` or `"KILLED"`. Defaults to `"FINISHED"`.
        """
        if not self._active:
            return
        self._active = False
        self._restore_sigterm()
        import mlflow

        try:
            if self._sampler is not None:
                self._sampler.stop()
                self._sampler = None
            metrics_file = self.out_dir / METRICS_FILENAME if self.out_dir is not None else None
            if metrics_file is not None and metrics_file.is_file():
                self._client.log_artifact(self.run_id, str(metrics_file))
        except Exception as e:  # never hide the exception that ended the run
            logger.warning("Could not finish logging MLflow run %s: %s", self.run_id, e)
        try:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                mlflow.end_run(status)
            else:
                self._client.set_terminated(self.run_id, status)
        except Exception as e:
            logger.warning("Could not mark MLflow run %s as %s: %s", self.run_id, status, e)
        finally:
            self.status = status
            self._restore_global_uris()

    def mark_killed(self):
        """Makes a normal exit of the `with` block end the run as KILLED.

        For pipelines that catch SIGTERM themselves, stop training gracefully and return.
        """
        self._requested_status = KILLED

    # -- store helpers -----------------------------------------------------------------------

    def _registry_uri(self):
        return os.environ.get("MLFLOW_REGISTRY_URI") or self.tracking_uri

    def _set_global_uris(self):
        # `mlflow.keras.log_model` logs through the fluent API, which reads the global URIs; set
        # them for the duration of the run and put back exactly what was there before.
        import mlflow
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        self._saved_uris = (
            tracking_utils._tracking_uri,
            registry_utils._registry_uri,
            os.environ.get("MLFLOW_TRACKING_URI"),
            os.environ.get("MLFLOW_REGISTRY_URI"),
        )
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self._registry_uri())

    def _restore_global_uris(self):
        if self._saved_uris is None:
            return
        import mlflow

        tracking, registry, env_tracking, env_registry = self._saved_uris
        self._saved_uris = None
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry)
        for name, value in (
            ("MLFLOW_TRACKING_URI", env_tracking),
            ("MLFLOW_REGISTRY_URI", env_registry),
        ):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def _experiment_id(self):
        from mlflow.exceptions import MlflowException

        experiment = self._client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                self._client.restore_experiment(experiment.experiment_id)
            if EXPERIMENT_KIND_TAG not in experiment.tags:
                self._client.set_experiment_tag(
                    experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                )
            return experiment.experiment_id
        root = store.artifact_root(self.tracking_uri)
        location = (root / self.experiment_name).as_uri() if root is not None else None
        try:
            return self._client.create_experiment(
                self.experiment_name,
                artifact_location=location,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except MlflowException:
            # Another training created it at the same moment.
            experiment = self._client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _previous_run(self):
        path = self.run_id_file
        if path is None or not path.is_file():
            return None
        run_id = path.read_text().strip()
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException:
            logger.warning(
                "%s names run %s, which is not in %s; starting a new run",
                path,
                run_id,
                self.tracking_uri,
            )
            return None
        if run.info.lifecycle_stage != "active" or run.info.experiment_id != self.experiment_id:
            logger.warning("Run %s in %s cannot be resumed; starting a new run", run_id, path)
            return None
        return run_id

    def _default_tags(self):
        import keras

        import toolkit

        tags = {
            "pipeline": self.pipeline,
            "keras_backend": keras.config.backend(),
            "keras_version": keras.__version__,
            "devices": device_description(),
            "toolkit_version": toolkit.__version__,
        }
        commit, dirty = git_state()
        if commit:
            tags["git_commit"] = commit
            tags["git_dirty"] = str(dirty).lower()
        if self.data_fingerprint:
            tags["data_fingerprint"] = str(self.data_fingerprint)
        if self.out_dir is not None:
            tags["out_dir"] = str(self.out_dir.absolute())
        tags.update({str(k): str(v) for k, v in self.extra_tags.items()})
        return tags

    def _log_params(self):
        from mlflow.entities import Param

        params = to_mlflow_params(self.config)
        existing = self._client.get_run(self.run_id).data.params if self.resumed else {}
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            # MLflow parameters cannot change; the resumed config is still logged as a file.
            logger.warning(
                "Resumed run %s keeps its original values for changed parameters: %s",
                self.run_id,
                ", ".join(changed),
            )
        todo = [Param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(todo), 100):  # MLflow accepts 100 params per request
            self._client.log_batch(self.run_id, params=todo[start : start + 100], synchronous=True)

    def _log_config(self):
        if self.config_path is not None:
            self._client.log_artifact(self.run_id, str(self.config_path))
            return
        # Through JSON first so paths, tuples and numpy scalars become plain YAML.
        plain = json.loads(json.dumps(self.config, default=str))
        self._client.log_dict(self.run_id, plain, CONFIG_ARTIFACT)

    def _install_sigterm(self):
        if not self.handle_sigterm or threading.current_thread() is not threading.main_thread():
            return
        if callable(signal.getsignal(signal.SIGTERM)):
            return  # a handler of the caller's (the pipelines' CLI) already raises

        def interrupt(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        self._previous_sigterm = signal.signal(signal.SIGTERM, interrupt)

    def _restore_sigterm(self):
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    # -- logging -----------------------------------------------------------------------------

    def callback(self, image_fn=None, log_model=True, input_example=None):
        """Returns the Keras callback for this run; put it before checkpoint callbacks.

        See `toolkit.tracking.MlflowCallback` for the arguments.
        """
        return MlflowCallback(
            self, image_fn=image_fn, log_model=log_model, input_example=input_example
        )

    def set_tags(self, tags):
        """Sets run tags (values become strings)."""
        if not self._active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, tags=items[start : start + 100], synchronous=True)

    def _load_logged(self):
        if self._logged_steps is not None:
            return
        self._logged_steps, self._logged_images = {}, set()
        if not self.resumed:
            return
        run = self._client.get_run(self.run_id)
        for key in run.data.metrics:
            if not key.startswith("system/"):
                history = self._client.get_metric_history(self.run_id, key)
                self._logged_steps[key] = {m.step for m in history}
        try:
            files = self._client.list_artifacts(self.run_id, "images")
        except Exception:
            files = []
        for info in files:
            match = _IMAGE_FILE.match(Path(info.path).name)
            if match:
                key = match.group("key").replace("~", "/").replace("#", "/")
                self._logged_images.add((key, int(match.group("step"))))

    def is_epoch_logged(self, epoch):
        """Whether an earlier attempt of this run already logged epoch `epoch`."""
        if not self._active:
            return False
        self._load_logged()
        return any(epoch in steps for steps in self._logged_steps.values())

    def log_epoch(self, epoch, metrics, images=None):
        """Logs one epoch: images first, then all metrics in one synchronous batch.

        Metrics and images already in the run at this step (an epoch re-run after a kill) are
        skipped, so every step is logged exactly once.

        Args:
            epoch: int. The step.
            metrics: dict[str, float].
            images: dict[str, Figure | np.ndarray | PIL.Image] or None.
        """
        if not self._active:
            return
        self._load_logged()
        step = int(epoch)
        for key, image in (images or {}).items():
            if (key, step) in self._logged_images:
                _to_pil(image)  # closes a figure nobody will log
                continue
            self._client.log_image(
                self.run_id, _to_pil(image), key=key, step=step, synchronous=True
            )
            self._logged_images.add((key, step))
        self.log_metrics(metrics, step=step)

    def log_metrics(self, metrics, step=None):
        """Logs scalar metrics at `step` (default 0) synchronously, skipping ones already logged.

        Args:
            metrics: dict[str, float].
            step: int or None.
        """
        if not self._active:
            return
        from mlflow.entities import Metric

        self._load_logged()
        step = int(step or 0)
        timestamp = int(time.time() * 1000)
        batch, skipped = [], []
        for key, value in metrics.items():
            key = _metric_key(key)
            steps = self._logged_steps.setdefault(key, set())
            if step in steps:
                skipped.append(key)
                continue
            batch.append(Metric(key, float(value), timestamp, step))
        if skipped:
            logger.warning(
                "Step %d of %s is already in MLflow run %s; keeping the first values",
                step,
                ", ".join(skipped),
                self.run_id,
            )
        for start in range(0, len(batch), 1000):
            self._client.log_batch(
                self.run_id, metrics=batch[start : start + 1000], synchronous=True
            )
        for metric in batch:
            self._logged_steps[metric.key].add(step)

    def log_image(self, image, key, step=0):
        """Logs one image (Figure, array or PIL) at `step` under `key`."""
        self.log_epoch(step, {}, images={key: image})

    def log_figure(self, figure, artifact_file):
        """Logs a matplotlib figure as a file artifact (e.g. `plots/roc.png`) and closes it."""
        if not self._active:
            _to_pil(figure)
            return
        self._client.log_image(self.run_id, _to_pil(figure), artifact_file=artifact_file)

    def log_artifact(self, path, artifact_path=None):
        """Logs a file or folder as an artifact of the run."""
        if not self._active:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, dictionary, artifact_file):
        """Logs a dict as a JSON or YAML artifact (by the file extension)."""
        if self._active:
            self._client.log_dict(self.run_id, dictionary, artifact_file)

    def log_model(self, model, input_example=None, signature=None):
        """Logs the model with the MLflow Keras flavor and registers a new model version.

        The signature comes from the model's symbolic inputs and outputs, else from running the
        model on `input_example`.

        Args:
            model: `keras.Model`.
            input_example: array or None. Used for the signature of subclassed models.
            signature: `mlflow.models.ModelSignature` or None. Overrides the inferred one.

        Returns:
            `mlflow.models.model.ModelInfo` or `None` when tracking is off.
        """
        if not self._active:
            return None
        import mlflow.keras

        if signature is None:
            signature = model_signature(model, input_example)
        if signature is None:
            logger.warning("Logging model without a signature: pass input_example=")
        self.model_info = mlflow.keras.log_model(
            model,
            name=MODEL_ARTIFACT,
            signature=signature,
            registered_model_name=self.registered_model_name,
            pip_requirements=_pip_requirements(),
        )
        self.model_version = getattr(self.model_info, "registered_model_version", None)
        return self.model_info


def _pip_requirements():
    # Given explicitly: MLflow would otherwise load the model in a subprocess to infer them.
    from importlib import metadata

    import keras

    requirements = [f"keras=={keras.__version__}"]
    backend_package = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(
        keras.config.backend()
    )
    for package in (backend_package, "numpy"):
        if package:
            try:
                requirements.append(f"{package}=={metadata.version(package)}")
            except metadata.PackageNotFoundError:
                requirements.append(package)
    return requirements


def _tensor_spec(tensor, index):
    import numpy as np
    from mlflow.types import TensorSpec

    shape = tuple(-1 if dim is None else int(dim) for dim in tensor.shape)
    name = getattr(tensor, "name", None) or f"tensor_{index}"
    return TensorSpec(np.dtype(str(tensor.dtype)), shape, name)


def model_signature(model, input_example=None):
    """Returns an MLflow `ModelSignature` for a Keras model, or `None` if it cannot be built.

    Functional and Sequential models: from their symbolic inputs and outputs (batch size -1).
    Other models: inferred from `input_example` and the model's output on it.
    """
    import keras
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import Schema

    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if inputs and outputs:
        return ModelSignature(
            inputs=Schema([_tensor_spec(t, i) for i, t in enumerate(inputs)]),
            outputs=Schema([_tensor_spec(t, i) for i, t in enumerate(outputs)]),
        )
    if input_example is None:
        return None
    try:
        prediction = model(input_example, training=False)
        to_numpy = keras.tree.map_structure(keras.ops.convert_to_numpy, prediction)
        example = keras.tree.map_structure(keras.ops.convert_to_numpy, input_example)
        if isinstance(to_numpy, list | tuple):  # MLflow wants a dict for several outputs
            to_numpy = {f"output_{i}": value for i, value in enumerate(to_numpy)}
        return infer_signature(example, to_numpy)
    except Exception as e:  # a missing signature must not fail a finished training
        logger.warning("Could not infer the model signature from input_example: %s", e)
        return None


def tracking_run(pipeline, config, out_dir, tracking_uri=None, enabled=True, **kwargs):
    """Opens the MLflow run of one training as a context manager.

    On entry: checks that the store is reachable (one quick request; a `UserError` naming the
    URI otherwise, before any training), starts a run in the `pipeline` experiment or resumes
    the one saved in `<out_dir>/mlflow_run_id`, and logs tags (Keras backend and version,
    devices, git commit, toolkit version, data fingerprint), the flattened config as parameters
    and the config file. While open it samples system metrics. On exit it logs
    `<out_dir>/metrics.json` if present and marks the run FINISHED, FAILED (exception) or
    KILLED (`KeyboardInterrupt`, SIGTERM, `tracker.mark_killed()`).

    Args:
        pipeline: str. `"asr"` or `"medimg"`: experiment and registered model name.
        config: dict or dataclass. The resolved configuration.
        out_dir: str or path-like. The run's output folder.
        tracking_uri: str or None. Defaults to `None` (`MLFLOW_TRACKING_URI`, else the default
            local store).
        enabled: bool or str. `False` or `"off"` disables tracking entirely. Defaults to `True`.
        **kwargs: further `Tracker` arguments (`run_name`, `config_path`, `data_fingerprint`,
            `tags`, `system_metrics`, `system_metrics_interval`, ...).

    Returns:
        `Tracker`, to be used in a `with` statement.

    Example:

    ```python
    with tracking_run(pipeline="asr", config=cfg, out_dir="runs/asr/x") as tracker:
        model.fit(x, y, epochs=3, callbacks=[tracker.callback()])
    ```
    """
    return Tracker(pipeline, config, out_dir, tracking_uri=tracking_uri, enabled=enabled, **kwargs)
