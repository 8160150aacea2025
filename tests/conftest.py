"""Test-wide settings: the Keras backend defaults to TensorFlow, seeds are fixed per test."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests never send MLflow usage data.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import keras  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI draws the same property-test examples on every run, so a submission's result does not
# depend on the luck of the draw; runs elsewhere keep drawing new examples (and keep those that
# failed in .hypothesis/).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1234)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"
