"""Store location, URI resolution, reachability check, config flattening and data fingerprints.

No MLflow run is started here; these tests are fast.
"""

import socket
import threading
import time
from pathlib import Path

import pytest

from toolkit.errors import UserError
from toolkit.tracking import (
    check_tracking_uri,
    data_fingerprint,
    default_home,
    default_tracking_uri,
    flatten_config,
    make_run_name,
    parse_tracking_setting,
    resolve_tracking_uri,
    to_mlflow_params,
)
from toolkit.tracking.params import MAX_KEY_LENGTH, MAX_VALUE_LENGTH, TRUNCATION_MARK
from toolkit.tracking.store import artifact_root, sqlite_path


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTENTION_TOOLKIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_default_store_is_absolute_under_toolkit_home(tmp_path, monkeypatch):
    assert default_home() == tmp_path / "home"
    assert default_tracking_uri() == f"sqlite:///{tmp_path}/home/mlflow.db"
    assert default_tracking_uri().startswith("sqlite:////")
    assert artifact_root(default_tracking_uri()) == tmp_path / "home" / "mlartifacts"

    monkeypatch.delenv("ATTENTION_TOOLKIT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_home() == tmp_path / "user" / ".local" / "share" / "attention-toolkit"

    # A relative ATTENTION_TOOLKIT_HOME is made absolute, so `mlflow ui` finds it from anywhere.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATTENTION_TOOLKIT_HOME", "rel")
    assert default_home() == tmp_path / "rel"


def test_resolve_order_argument_then_environment_then_default(monkeypatch, tmp_path):
    assert resolve_tracking_uri() == default_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri() == "http://tracking.example:5000"
    assert resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"


def test_sqlite_path_parsing():
    assert sqlite_path("sqlite:////abs/dir/mlflow.db") == Path("/abs/dir/mlflow.db")
    assert sqlite_path("sqlite:///rel.db") == Path("rel.db")
    assert sqlite_path("http://host:5000") is None
    assert artifact_root("http://host:5000") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, True), (True, True), (False, False), ("off", False), ("OFF", False), ("on", True)],
)
def test_parse_tracking_setting(value, expected):
    assert parse_tracking_setting(value) is expected


def test_parse_tracking_setting_rejects_other_values():
    with pytest.raises(UserError, match="tracking must be 'on' or 'off'.*'maybe'"):
        parse_tracking_setting("maybe")


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_raises_user_error_naming_uri_quickly():
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        check_tracking_uri(uri)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert uri in message and "unreachable" in message
    assert "\n" not in message


def test_silent_server_times_out_within_limit():
    # Accepts the TCP connection but never answers: the check must give up after its timeout
    # instead of MLflow's minutes of retries.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    uri = f"http://127.0.0.1:{server.getsockname()[1]}"
    try:
        start = time.monotonic()
        with pytest.raises(UserError, match="unreachable") as info:
            check_tracking_uri(uri, timeout=1.0)
        elapsed = time.monotonic() - start
    finally:
        server.close()
    assert uri in str(info.value)
    assert 0.9 < elapsed < 10


def test_http_error_status_is_a_user_error():
    # A web server that is not MLflow answers 404.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    uri = f"http://127.0.0.1:{server.getsockname()[1]}"

    def answer():
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with pytest.raises(UserError, match="HTTP 404") as info:
            check_tracking_uri(uri)
    finally:
        thread.join(5)
        server.close()
    assert uri in str(info.value)


def test_sqlite_store_folder_is_created_and_checked(tmp_path):
    uri = f"sqlite:///{tmp_path}/new/sub/mlflow.db"
    check_tracking_uri(uri)
    assert (tmp_path / "new" / "sub").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot create the tracking store folder") as info:
        check_tracking_uri(f"sqlite:///{blocker}/mlflow.db")
    assert str(blocker) in str(info.value)


def test_flatten_config_dotted_keys():
    config = {
        "model": {"num_heads": 4, "kernels": [3, 3], "blocks": [{"units": 8}, {"units": 16}]},
        "lr": 1e-3,
        "empty": {},
        "name": None,
    }
    assert flatten_config(config) == {
        "model.num_heads": 4,
        "model.kernels": [3, 3],
        "model.blocks.0.units": 8,
        "model.blocks.1.units": 16,
        "lr": 1e-3,
        "empty": {},
        "name": None,
    }


def test_flatten_config_accepts_dataclasses():
    import dataclasses

    @dataclasses.dataclass
    class Model:
        num_heads: int = 2
        path: Path = Path("/data/x")

    @dataclasses.dataclass
    class Config:
        model: Model = dataclasses.field(default_factory=Model)
        epochs: int = 3

    params = to_mlflow_params(Config())
    assert params == {"model.num_heads": "2", "model.path": "/data/x", "epochs": "3"}


def test_mlflow_params_limits():
    config = {f"group{g}": {f"p{i}": i for i in range(g * 100, g * 100 + 100)} for g in range(6)}
    config["long"] = "x" * 10_000
    config["k" * 300] = 1
    config["bad:key[0]"] = [1, "a"]
    params = to_mlflow_params(config)
    assert len(params) == 603
    assert params["group5.p599"] == "599"
    assert len(params["long"]) == MAX_VALUE_LENGTH and params["long"].endswith(TRUNCATION_MARK)
    long_keys = [k for k in params if k.startswith("kkk")]
    assert len(long_keys) == 1 and len(long_keys[0]) == MAX_KEY_LENGTH
    assert params["bad_key_0_"] == '[1, "a"]'


def test_make_run_name_says_what_ran():
    when = time.strptime("2026-11-21 11:30", "%Y-%m-%d %H:%M")
    assert make_run_name("asr", "transformer", when) == "asr-transformer-20261121-1130"
    assert make_run_name("medimg", None, when) == "medimg-20261121-1130"


def test_data_fingerprint_is_stable_and_content_sensitive(tmp_path):
    a, b = tmp_path / "data" / "a.wav", tmp_path / "data" / "sub" / "b.wav"
    b.parent.mkdir(parents=True)
    a.write_bytes(b"aaa")
    b.write_bytes(b"bbb")
    first = data_fingerprint([a, b])
    assert len(first) == 16 and int(first, 16) >= 0
    assert data_fingerprint([b, a]) == first  # listing order does not matter

    copy = tmp_path / "copy"
    (copy / "sub").mkdir(parents=True)
    (copy / "a.wav").write_bytes(b"aaa")
    (copy / "sub" / "b.wav").write_bytes(b"bbb")
    assert data_fingerprint([copy / "a.wav", copy / "sub" / "b.wav"]) == first  # location neither

    b.write_bytes(b"bbc")
    assert data_fingerprint([a, b]) != first
    records = [{"id": "u1", "text": "hi"}, {"text": "yo", "id": "u2"}]
    assert data_fingerprint(records=records) == data_fingerprint(
        records=[{"text": "hi", "id": "u1"}, {"id": "u2", "text": "yo"}]
    )
    assert data_fingerprint(records=records) != data_fingerprint(records=records[::-1])
    with pytest.raises(UserError, match="missing.wav"):
        data_fingerprint([tmp_path / "missing.wav"])
