"""MLflow experiment tracking shared by the pipelines."""

from toolkit.tracking.callback import MlflowCallback as MlflowCallback
from toolkit.tracking.callback import current_learning_rate as current_learning_rate
from toolkit.tracking.fingerprint import data_fingerprint as data_fingerprint
from toolkit.tracking.params import flatten_config as flatten_config
from toolkit.tracking.params import to_mlflow_params as to_mlflow_params
from toolkit.tracking.run import Tracker as Tracker
from toolkit.tracking.run import make_run_name as make_run_name
from toolkit.tracking.run import model_signature as model_signature
from toolkit.tracking.run import tracking_run as tracking_run
from toolkit.tracking.store import check_tracking_uri as check_tracking_uri
from toolkit.tracking.store import default_home as default_home
from toolkit.tracking.store import default_tracking_uri as default_tracking_uri
from toolkit.tracking.store import parse_tracking_setting as parse_tracking_setting
from toolkit.tracking.store import resolve_tracking_uri as resolve_tracking_uri
from toolkit.tracking.system import SystemMetricsSampler as SystemMetricsSampler
from toolkit.tracking.system import device_description as device_description
from toolkit.tracking.system import git_state as git_state
