"""Audit the direct dependencies in pyproject.toml, at their installed versions, for known
vulnerabilities. Run through `scripts/audit.sh`; exit code 1 when one is found.

1. Every dependency named in `[project] dependencies` and in each optional group is pinned to
   the version installed in this environment (not installed: reported, not audited).
2. `pip-audit -s pypi --no-deps` audits those pins against PyPI's vulnerability data (the
   PyPA advisory database and OSV, as PyPI publishes them per release).
3. Where pip-audit cannot fetch a release's data (some mirrors serve only the project-level
   JSON), the project-level JSON is used instead; it lists the vulnerabilities of the newest
   release, so it answers exactly when the installed version is the newest. Anything else is
   reported as "not audited" (exit code 3 with `--strict`).

Advisories in `scripts/audit-ignore.txt` are not counted; each line there must say why it does
not affect this project and that no fixed version installs on Python 3.11.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE_FILE = ROOT / "scripts" / "audit-ignore.txt"
PYPI_JSON = "https://pypi.org/pypi/{name}/json"


def direct_dependencies(pyproject: Path) -> list[tuple[str, str]]:
    """`(name, group)` for every requirement of pyproject.toml (group "runtime" or the extra)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    groups = [("runtime", project.get("dependencies", []))]
    groups += sorted(project.get("optional-dependencies", {}).items())
    found, seen = [], set()
    for group, requirements in groups:
        for requirement in requirements:
            name = re.split(r"[\s<>=!~\[;(@]", requirement.strip(), maxsplit=1)[0]
            key = re.sub(r"[-_.]+", "-", name).lower()
            if key not in seen:
                seen.add(key)
                found.append((name, group))
    return found


def read_ignores(path: Path) -> dict[str, str]:
    """`{advisory id: reason}` from the ignore file (`ID  reason...`, `#` comments)."""
    ignores = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                advisory, _, reason = line.partition(" ")
                if not reason.strip():
                    sys.exit(f"audit: {path}: {advisory} is ignored without a reason")
                ignores[advisory] = reason.strip()
    return ignores


def run_pip_audit(pins: dict[str, str], ignores, timeout: float) -> dict:
    """pip-audit's JSON report for `pins` (`{name: version}`)."""
    with tempfile.TemporaryDirectory() as folder:
        requirements = Path(folder) / "requirements.txt"
        requirements.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
        report = Path(folder) / "report.json"
        command = [
            sys.executable, "-m", "pip_audit", "-s", "pypi", "--disable-pip", "--no-deps",
            "-r", str(requirements), "-f", "json", "-o", str(report), "--progress-spinner", "off",
            "--timeout", str(int(timeout)),
        ]  # fmt: skip
        for advisory in ignores:
            command += ["--ignore-vuln", advisory]
        done = subprocess.run(command, capture_output=True, text=True)
        if not report.is_file():
            sys.exit(f"audit: pip-audit failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        return json.loads(report.read_text())


def project_json(name: str, timeout: float) -> dict | None:
    try:
        with urllib.request.urlopen(PYPI_JSON.format(name=name), timeout=timeout) as response:
            return json.load(response)
    except (urllib.error.URLError, TimeoutError, ValueError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--strict", action="store_true", help="exit 3 if any dependency could not be audited"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    args = parser.parse_args(argv)

    ignores = read_ignores(IGNORE_FILE)
    pins, groups, not_installed = {}, {}, []
    for name, group in direct_dependencies(ROOT / "pyproject.toml"):
        try:
            pins[name] = importlib.metadata.version(name)
            groups[name] = group
        except importlib.metadata.PackageNotFoundError:
            not_installed.append(f"{name} ({group})")

    report = run_pip_audit(pins, ignores, args.timeout)
    found, audited, unaudited = [], [], []
    for entry in report.get("dependencies", []):
        name, version = entry["name"], entry.get("version") or pins.get(entry["name"], "?")
        if "skip_reason" not in entry:
            audited.append(f"{name}=={version} (pip-audit)")
            found += [(name, version, v["id"], v.get("fix_versions", [])) for v in entry["vulns"]]
            continue
        data = project_json(name, args.timeout)
        if data is None:
            unaudited.append(f"{name}=={version}: {entry['skip_reason']}")
            continue
        latest = data["info"]["version"]
        if latest != version:
            unaudited.append(
                f"{name}=={version}: PyPI's data for this release cannot be fetched here, and "
                f"the project-level data covers only the newest release, {latest}"
            )
            continue
        audited.append(f"{name}=={version} (newest release, project-level PyPI data)")
        for vuln in data.get("vulnerabilities") or []:
            if vuln.get("withdrawn") or vuln["id"] in ignores:
                continue
            if set(vuln.get("aliases") or []) & set(ignores):
                continue
            found.append((name, version, vuln["id"], vuln.get("fixed_in") or []))

    print(f"audit: {len(pins)} direct dependencies of pyproject.toml at their installed versions")
    for line in audited:
        print(f"  ok          {line}")
    for line in unaudited:
        print(f"  NOT AUDITED {line}")
    for line in not_installed:
        print(f"  not installed, skipped: {line}")
    for advisory, reason in ignores.items():
        print(f"  ignored advisory {advisory}: {reason}")
    if found:
        print(f"audit: {len(found)} known vulnerabilities in direct dependencies:")
        for name, version, advisory, fixes in found:
            fix = f"fixed in {', '.join(fixes)}" if fixes else "no fixed version"
            print(f"  VULNERABLE  {name}=={version} ({groups.get(name, '?')}): {advisory}, {fix}")
        return 1
    if unaudited:
        print(f"audit: no known vulnerabilities found, but {len(unaudited)} dependencies could "
              "not be audited (see above)")  # fmt: skip
        return 3 if args.strict else 0
    print("audit: no known vulnerabilities in direct dependencies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
