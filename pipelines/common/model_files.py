"""Loading `.keras` model files safely, with one clear line for each way a file can be bad.

Keras reports a missing file, a file that is not a zip and a truncated zip all as
"File not found: filepath=...". `load_model_file` tells them apart before Keras opens the file,
refuses content that could run code, and always loads with `safe_mode=True`. Each problem is a
`UserError` whose one-line message names the file and the reason:

- the path does not exist, is a folder, or is an empty file;
- the file is not a zip archive (a text file, a Keras 2 HDF5 `.h5` model, ...);
- the zip is truncated (a copy or download cut short) or one of its members fails its CRC check;
- the zip holds no `config.json` (not a Keras model), or the JSON is invalid;
- the model contains a `Lambda` layer or any other serialized Python function: refused, since
  loading it could run arbitrary code (even where Keras itself would accept a named function);
- the model uses a class this program has not registered (a custom layer from other code, or a
  model saved by the other pipeline): refused, naming the class.

Whatever Keras still refuses after these checks is reported with the first line of its message.
The classes a file may legitimately use must be registered (their modules imported) before
`load_model_file` is called.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

from toolkit.errors import UserError

__all__ = ["MAX_CONFIG_BYTES", "load_model_file", "read_model_config"]

#: Largest `config.json` read from a model file (real ones are a few hundred kilobytes).
MAX_CONFIG_BYTES = 64 * 2**20

_CODE_CLASSES = {"Lambda", "__lambda__"}


def _fail(path: Path, what: str, reason: str) -> UserError:
    return UserError(f"{path}: cannot load the {what}: {reason}")


def _walk(node):
    """Every dict in a JSON tree, depth first."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _not_a_zip_reason(head: bytes) -> str:
    if head.startswith(b"PK\x03\x04"):
        return (
            "the .keras zip file is truncated (its end, with the list of members, is missing; "
            "was the copy or download cut short?)"
        )
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "it is an HDF5 file (a Keras 2 .h5 model?), not a .keras zip archive"
    return "it is not a .keras file (a .keras model is a zip archive; this file is not a zip)"


def _check_classes(path: Path, what: str, config) -> None:
    """Refuse Python code and classes that are not registered in this program."""
    import keras

    for entry in _walk(config):
        class_name = entry.get("class_name")
        if not isinstance(class_name, str):
            continue
        if class_name in _CODE_CLASSES:
            kind = "a Lambda layer" if class_name == "Lambda" else "a serialized Python function"
            raise _fail(
                path,
                what,
                f"it contains {kind}, which could run arbitrary code; refused (models are only "
                "loaded with safe_mode=True)",
            )
        module = entry.get("module")
        registered = entry.get("registered_name")
        if isinstance(registered, str) and ">" in registered:
            if keras.saving.get_registered_object(registered) is not None:
                continue
            name = registered
        elif isinstance(module, str) and module and not module.startswith("keras"):
            name = f"{module}.{class_name}"
        else:
            continue
        if isinstance(module, str) and module.startswith("pipelines."):
            pipeline = ".".join(module.split(".")[:2])
            raise _fail(
                path,
                what,
                f"it was saved by {pipeline} (class {class_name}), which this command does not "
                "load",
            )
        raise _fail(
            path,
            what,
            f"it uses the class {name}, which is not registered in this program (a custom "
            "layer from other code?); unknown classes are refused",
        )


def read_model_config(path: str | Path, what: str = "model") -> dict:
    """Check a `.keras` file without Keras loading it; return its parsed `config.json`.

    Args:
        path: str or Path. The model file.
        what: str. What the file should hold, for messages (`"model"`, `"speech recognizer"`).
            Defaults to `"model"`.

    Returns:
        The model's configuration (the parsed `config.json`).

    Raises:
        UserError: one line naming the file and the reason (see the module docstring).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise _fail(path, what, "it is a folder, not a .keras file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as error:
        raise _fail(path, what, f"the file cannot be read ({error.strerror or error})") from None
    if size == 0:
        raise _fail(path, what, "the file is empty (0 bytes)")
    if not zipfile.is_zipfile(path):
        raise _fail(path, what, _not_a_zip_reason(head))
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
            if bad_member is not None:
                raise _fail(path, what, f"the zip is corrupt ({bad_member} fails its CRC check)")
            names = set(archive.namelist())
            if "config.json" not in names:
                raise _fail(
                    path, what, "the zip archive holds no config.json, so it is not a Keras model"
                )
            info = archive.getinfo("config.json")
            if info.file_size > MAX_CONFIG_BYTES:
                raise _fail(
                    path, what, f"its config.json is {info.file_size:,} bytes, implausibly large"
                )
            text = archive.read("config.json")
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
        raise _fail(path, what, f"the zip is truncated or corrupt ({error})") from None
    try:
        config = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(path, what, f"its config.json is not valid JSON ({error})") from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise _fail(path, what, "its config.json does not describe a Keras model")
    _check_classes(path, what, config)
    return config


def load_model_file(path: str | Path, what: str = "model", compile: bool = False):
    """Load a `.keras` model with `safe_mode=True` after `read_model_config`'s checks.

    Args:
        path: str or Path. The `.keras` file.
        what: str. What the file should hold, for messages. Defaults to `"model"`.
        compile: bool. Restore the training configuration too. Defaults to `False`.

    Returns:
        The `keras.Model`.

    Raises:
        UserError: the file is missing, not a zip, truncated, not a Keras model, contains code
            or unknown classes, or Keras cannot load it; one line naming the file and why.

    Example:

    ```python
    import toolkit.layers  # registers the classes the file uses
    model = load_model_file("runs/medimg/20260101-120000/model.keras")
    ```
    """
    import keras

    path = Path(path)
    read_model_config(path, what)
    if path.suffix.lower() != ".keras":
        raise _fail(path, what, f"the file name must end in .keras (Keras 3), not {path.suffix!r}")
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=compile)
    except Exception as error:  # noqa: BLE001 - whatever Keras refuses is the file's problem
        text = " ".join(str(error).split())
        if "arbitrary code" in text or "safe_mode" in text:
            reason = "it contains Python code, refused (models are only loaded with safe_mode=True)"
        else:
            reason = text[:200] or type(error).__name__
        raise _fail(path, what, reason) from None
