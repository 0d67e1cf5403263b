"""A local Label Studio for one machine: install the pinned server into its own venv, start it, stop it.

The server pins its own SDK, Django and friends, so it never goes into the project's venv: it lives in
its own venv and is driven only through its CLI and HTTP API. This module uses the standard library
only, so `.ci/install_labelstudio.sh` can run it with any Python 3.11 (`python -m labeling.labelstudio_server`).

Facts this relies on (label-studio 1.23.2, see ../shared/labelstudio/NOTES.md):
- `label-studio start` defaults to 0.0.0.0:8080 and silently moves to PORT+1 when PORT is taken, so we
  always pass host and port, check the port first and read the port it really took from its log.
- `label-studio --version` starts a server: never call it; the version comes from importlib.metadata.
- The admin's legacy token (LABEL_STUDIO_USER_TOKEN) is applied only when the user is first created.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

LABEL_STUDIO_VERSION = "1.23.2"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_USERNAME = "admin@defect-loop.local"
# LS's own default document root. Serving is still gated per directory: LS serves a file only if a
# local-files storage of a project the logged-in user may see has a path that contains it, and the
# backend creates storages only for the directories that hold pushed images.
DEFAULT_DOCUMENT_ROOT = "/"
STATE_FILE_NAME = "defect-loop-labelstudio.json"
LOG_FILE_NAME = "defect-loop-labelstudio.log"
_STARTED_AT_RE = re.compile(r"Starting development server at http://([\d.]+):(\d+)/")

# Popen objects of the servers this process started, so stop_server() can reap them (no zombies).
_CHILDREN: dict[int, subprocess.Popen] = {}


class LabelStudioServerError(RuntimeError):
    """Label Studio could not be installed, started or stopped; the message says why and what to do."""


@dataclass(frozen=True)
class RunningServer:
    url: str
    token: str  # legacy API token of the admin: header `Authorization: Token <token>`
    pid: int
    data_dir: Path
    log_path: Path
    username: str = DEFAULT_USERNAME
    password: str | None = field(default=None, repr=False)
    document_root: str = DEFAULT_DOCUMENT_ROOT
    already_running: bool = False  # labelstudio_up found it running and started nothing

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].rstrip("/"))


# ---------------------------------------------------------------------------------------------------------
# install


def default_venv_dir() -> Path:
    """The server's own venv: $DEFECT_LOOP_LABELSTUDIO_VENV, else ~/.cache/defect-loop/labelstudio-venv."""
    return Path(os.environ.get("DEFECT_LOOP_LABELSTUDIO_VENV") or "~/.cache/defect-loop/labelstudio-venv").expanduser()


def server_executable(venv_dir: Path | str | None = None) -> Path:
    return Path(venv_dir or default_venv_dir()) / "bin" / "label-studio"


def installed_version(venv_dir: Path | str | None = None) -> str | None:
    """The label-studio version installed in the venv, or None when there is none (never runs the server)."""
    python = Path(venv_dir or default_venv_dir()) / "bin" / "python"
    if not python.exists():
        return None
    result = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('label-studio'))"],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() if result.returncode == 0 else None


def install_server(
    *,
    venv_dir: Path | str | None = None,
    version: str = LABEL_STUDIO_VERSION,
    python: str | None = None,
    use_uv: bool = True,
) -> Path:
    """Install label-studio==version into its own venv; a no-op when that version is already there.

    uv (from PyPI, installed into the same venv) takes ~12 s where pip takes ~45 s; pip is the fallback.
    Returns the venv directory.
    """
    venv = Path(venv_dir or default_venv_dir())
    if installed_version(venv) == version and server_executable(venv).exists():
        return venv
    base_python = python or getattr(sys, "_base_executable", None) or sys.executable
    if not (venv / "bin" / "python").exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        _run([base_python, "-m", "venv", str(venv)], what="create the Label Studio venv")
    venv_python = str(venv / "bin" / "python")
    requirement = f"label-studio=={version}"
    if use_uv:
        try:
            uv = shutil.which("uv") or str(venv / "bin" / "uv")
            if not Path(uv).exists():
                _run([venv_python, "-m", "pip", "install", "--quiet", "uv"], what="install uv")
            _run([uv, "pip", "install", "--quiet", "--python", venv_python, requirement], what=f"install {requirement} with uv")
        except LabelStudioServerError as error:
            print(f"uv failed, falling back to pip: {error}", file=sys.stderr)
            _run([venv_python, "-m", "pip", "install", "--quiet", requirement], what=f"install {requirement} with pip")
    else:
        _run([venv_python, "-m", "pip", "install", "--quiet", requirement], what=f"install {requirement} with pip")
    found = installed_version(venv)
    if found != version:
        raise LabelStudioServerError(f"installed label-studio {found!r} into {venv}, expected {version}")
    return venv


def _run(command: list[str], *, what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise LabelStudioServerError(f"could not {what} (exit {result.returncode}): {tail}")
