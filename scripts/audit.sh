#!/usr/bin/env bash
# Audits the direct dependencies of pyproject.toml, at the versions installed in .venv, for known
# vulnerabilities (pip-audit against PyPI's advisory data; see scripts/audit_deps.py).
# Exit code 1: a known vulnerability (fix it by raising the pin, or document an ignore in
# scripts/audit-ignore.txt); 3 with --strict: some dependency could not be audited.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -m pip_audit --version >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "pip-audit>=2.7"
fi
exec .venv/bin/python scripts/audit_deps.py "$@"
