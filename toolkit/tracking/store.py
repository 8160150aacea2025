"""Where runs are stored: the default local store, URI resolution and a fast reachability check.

MLflow's own default store is a *relative* `mlflow.db`, so `mlflow ui` started in another folder
shows nothing. The toolkit instead keeps every run in one absolute location:

- `$ATTENTION_TOOLKIT_HOME` if that variable is set, else `~/.local/share/attention-toolkit/`;
- inside it `mlflow.db` (the SQLite backend store) and `mlartifacts/` (artifacts: models, images,
  configs).

`tracking_uri=` (the pipelines' `--tracking-uri`) or the `MLFLOW_TRACKING_URI` environment
variable select another store or a tracking server instead.

Nothing here imports MLflow, so `import toolkit` stays fast.
"""

import base64
import contextlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from toolkit.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; stores are then not locked
    fcntl = None

HOME_ENV = "ATTENTION_TOOLKIT_HOME"
DB_FILENAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"

_ON = {"on", "true", "1", "yes", "mlflow"}
_OFF = {"off", "false", "0", "no", "none"}


def default_home():
    """Returns the absolute folder that holds the default tracking store.

    Returns:
        `pathlib.Path`: `$ATTENTION_TOOLKIT_HOME` when set (made absolute), else
        `~/.local/share/attention-toolkit`.
    """
    value = os.environ.get(HOME_ENV)
    if value:
        return Path(value).expanduser().absolute()
    return Path("~/.local/share/attention-toolkit").expanduser().absolute()


def sqlite_uri(db_path):
    """Returns the SQLAlchemy URI of a SQLite file, absolute: `sqlite:////abs/path/mlflow.db`."""
    return "sqlite:///" + Path(db_path).expanduser().absolute().as_posix()


def default_tracking_uri():
    """Returns the URI of the default store: `sqlite:///<default_home()>/mlflow.db`."""
    return sqlite_uri(default_home() / DB_FILENAME)


def resolve_tracking_uri(tracking_uri=None):
    """Picks the tracking URI: the argument, else `MLFLOW_TRACKING_URI`, else the default store.

    Args:
        tracking_uri: str or None. An explicit URI (`http://host:5000`, `sqlite:///...`).
            Defaults to `None`.

    Returns:
        str. The URI to use.
    """
    if tracking_uri:
        return str(tracking_uri)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return default_tracking_uri()


def is_remote_uri(uri):
    """Whether `uri` names a tracking server reached over HTTP(S)."""
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def sqlite_path(uri):
    """Returns the database file of a `sqlite:///` URI, or `None` for other URIs."""
    if not uri.startswith("sqlite:"):
        return None
    path = uri[len("sqlite:") :]
    if not path.startswith("///"):
        return None
    # `sqlite:///rel.db` is relative, `sqlite:////abs/x.db` absolute: drop exactly 3 slashes.
    path = path[3:]
    path = path.split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path)


def artifact_root(uri):
    """Returns the absolute artifact folder used for experiments created in a local store.

    For a SQLite store this is the `mlartifacts/` folder beside the database file, so runs in the
    default store keep their artifacts under `default_home()/mlartifacts`. For a tracking server
    (`None`) the server decides (with `mlflow server`, artifacts are proxied and stored under its
    `--artifacts-destination`).

    Args:
        uri: str. A resolved tracking URI.

    Returns:
        `pathlib.Path` or `None`.
    """
    db = sqlite_path(uri)
    if db is None:
        return None
    return db.absolute().parent / ARTIFACTS_DIRNAME


def parse_tracking_setting(value):
    """Parses a `tracking=` setting into a bool: `on`/`true`/`1` or `off`/`false`/`0`.

    Args:
        value: bool, str or None. `None` means on.

    Returns:
        bool. Whether tracking is enabled.

    Raises:
        UserError: for any other value.
    """
    if value is None or isinstance(value, bool):
        return value is None or value
    text = str(value).strip().lower()
    if text in _ON:
        return True
    if text in _OFF:
        return False
    raise UserError(f"tracking must be 'on' or 'off'. Received: tracking={value!r}")


def _auth_headers():
    # The same credentials MLflow's client would send, so a protected server is not reported
    # as unreachable.
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        raw = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}
    return {}


def check_tracking_uri(uri, timeout=5.0):
    """Fails fast when the tracking store cannot be used.

    MLflow's client retries an unreachable server for minutes; this makes one request with a
    short timeout instead. For an HTTP(S) server it POSTs an `experiments/search` request (the
    MLflow REST API under `uri`); for a SQLite store it makes sure the folder can be created and
    written.

    Args:
        uri: str. A resolved tracking URI.
        timeout: float. Seconds to wait for the server. Defaults to `5.0`.

    Raises:
        UserError: one line naming `uri` and the reason.
    """
    if is_remote_uri(uri):
        url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
        body = json.dumps({"max_results": 1}).encode()
        headers = {"Content-Type": "application/json", **_auth_headers()}
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read(1)
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise UserError(
                    f"MLflow tracking server {uri} refused the credentials (HTTP {e.code}); "
                    "set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
                ) from None
            raise UserError(
                f"MLflow tracking server {uri} is not usable: HTTP {e.code} from {url}"
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"MLflow tracking server {uri} is unreachable: {reason}") from None
        return
    db = sqlite_path(uri)
    if db is not None:
        folder = db.absolute().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot create the tracking store folder {folder} for {uri}: {e.strerror}"
            ) from None
        if not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise UserError(f"the tracking store {uri} is not writable")


@contextlib.contextmanager
def creation_lock(uri):
    """Holds an exclusive lock on `<db>.lock` beside a SQLite store (no-op for other URIs).

    MLflow creates and migrates a SQLite store's tables on first use without a lock (its
    tracking and model registry stores call `_initialize_tables` directly), so two trainings
    starting together on a new store fail with `table alembic_version already exists` or
    `duplicate column name`. Opening the stores while holding this lock makes the second
    process wait until the first has created the tables; it then only checks them.

    Args:
        uri: str. A resolved tracking or registry URI.
    """
    db = sqlite_path(uri)
    if db is None or fcntl is None:
        yield
        return
    lock_path = db.absolute().parent / (db.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
