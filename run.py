#!/usr/bin/env python3
"""The two commands of the README, each setting up what it needs on a machine with only Python 3.11+:

    python3 run.py                 # the main job: snakemake on the sample corpus with config.ini
    python3 run.py test            # the tests (pytest)

Both create a virtual environment in .venv on first use (pip install -r requirements.txt, and for the tests
requirements-test.txt too) and reuse it afterwards; it is reinstalled when a requirements file changes.
Anything after the command goes to Snakemake or pytest:

    python3 run.py --cores 16 --config ini=configs/pile-gpt2-small.ini
    python3 run.py test -k train -x
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")


def ensure_env(requirements: list[str]) -> None:
    """.venv with these requirement files installed; a stamp of their sha256 skips the install next time."""
    if sys.version_info < (3, 11):
        sys.exit(f"run.py: Python 3.11 or newer is needed, this is {sys.version.split()[0]}")
    files = [ROOT / r for r in requirements]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    stamp = VENV / f".installed-{'+'.join(f.stem for f in files)}"
    if stamp.exists() and stamp.read_text() == digest and PYTHON.exists():
        return
    if not PYTHON.exists():
        print(f"run.py: creating {VENV.relative_to(ROOT)} ...", flush=True)
        venv.create(VENV, with_pip=True)
    print(f"run.py: installing {', '.join(requirements)} into .venv ...", flush=True)
    cmd = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    for f in files:
        cmd += ["-r", str(f)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if argv[:1] == ["test"]:
        ensure_env(["requirements.txt", "requirements-test.txt"])
        cmd = [str(PYTHON), "-m", "pytest", *argv[1:]]
    else:
        ensure_env(["requirements.txt"])
        cores = [] if any(a in ("--cores", "-c", "--jobs", "-j") or a.startswith(("--cores=", "-c", "--jobs="))
                          for a in argv) else ["--cores", str(os.cpu_count() or 1)]
        cmd = [str(PYTHON), "-m", "snakemake", *cores, *argv]
    print("run.py:", " ".join(cmd[2:]), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
