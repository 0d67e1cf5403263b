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
INSTALLED_MARKER = ".defect-loop-installed"  # written last: a venv without it is re-checked and completed
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
    marker = venv / INSTALLED_MARKER
    if marker.exists() and marker.read_text().strip() == version and installed_version(venv) == version:
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
    # Bytecode now, once: with PYTHONDONTWRITEBYTECODE set (as here and in CI) every start would otherwise
    # recompile ~4000 modules, 10+ s of a 12 s start.
    site_packages = subprocess.run(
        [venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    subprocess.run([venv_python, "-m", "compileall", "-q", "-j", "0", site_packages], capture_output=True)
    marker.write_text(version)
    return venv


def _run(command: list[str], *, what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise LabelStudioServerError(f"could not {what} (exit {result.returncode}): {tail}")


# ---------------------------------------------------------------------------------------------------------
# start / stop


def server_environment(
    *,
    data_dir: Path,
    document_root: str = DEFAULT_DOCUMENT_ROOT,
    username: str | None = None,
    password: str | None = None,
    token: str | None = None,
    base_env: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment Label Studio reads at start: SQLite in data_dir, admin + legacy token, local files, offline."""
    env = dict(os.environ if base_env is None else base_env)
    # A Redis on localhost would turn imports and webhooks into background jobs that no worker runs.
    for key in ("REDIS_LOCATION", "LABEL_STUDIO_REDIS_LOCATION", "DJANGO_SETTINGS_MODULE"):
        env.pop(key, None)
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "DJANGO_DB": "sqlite",
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
            # Our own webhook receiver is on 127.0.0.1, which SSRF protection refuses with 403.
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
            # No phone-home: no version check, no analytics, no Sentry (its DSN defaults to a public one).
            "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "PYTHONUNBUFFERED": "1",  # the "Starting development server at" line must reach the log at once
        }
    )
    if username and password:
        env["LABEL_STUDIO_USERNAME"] = username
        env["LABEL_STUDIO_PASSWORD"] = password
    else:
        env.pop("LABEL_STUDIO_USERNAME", None)
        env.pop("LABEL_STUDIO_PASSWORD", None)
    if token:
        env["LABEL_STUDIO_USER_TOKEN"] = token
    else:
        env.pop("LABEL_STUDIO_USER_TOKEN", None)
    return env


def resolve_document_root(document_root: str | None = None) -> str:
    """The argument, else env LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (the backend reads the same), else "/"."""
    return os.path.abspath(document_root or os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT") or DEFAULT_DOCUMENT_ROOT)


def port_is_free(port: int, host: str = DEFAULT_HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    # Label Studio's own test is a connect to localhost: refuse anything that answers there too.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) != 0


def free_port(host: str = DEFAULT_HOST) -> int:
    """A free loopback port whose next port is free too (Label Studio moves to PORT+1 when PORT is taken)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        if port < 65535 and port_is_free(port, host) and port_is_free(port + 1, host):
            return port
    raise LabelStudioServerError("no free loopback port found")


def health_ok(url: str, *, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def token_works(url: str, token: str, *, timeout_s: float = 5.0) -> bool:
    request = urllib.request.Request(
        f"{url.rstrip('/')}/api/current-user/whoami", headers={"Authorization": f"Token {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def extract_template(template: Path | str, data_dir: Path | str) -> bool:
    """Unpack a pre-migrated data dir (see make_template) into an empty data_dir; False if data_dir is not empty."""
    data_dir = Path(data_dir)
    if data_dir.exists() and any(data_dir.iterdir()):
        return False
    data_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(template) as archive:
        archive.extractall(data_dir, filter="data")
    return True


def start_server(
    *,
    data_dir: Path | str,
    port: int | None = None,
    username: str = DEFAULT_USERNAME,
    password: str | None = None,
    token: str | None = None,
    document_root: str | None = None,
    venv_dir: Path | str | None = None,
    host: str = DEFAULT_HOST,
    template: Path | str | None = None,
    timeout_s: float = 240.0,
) -> RunningServer:
    """Start Label Studio headless on host:port with SQLite in data_dir and wait for /health.

    The process runs in its own session (it outlives the caller); stop it with stop_server(). A fresh data
    dir runs ~240 migrations (20-40 s); a template (tar of a migrated data dir) cuts that to ~3 s.
    Raises LabelStudioServerError when the port is taken, the server dies, moves port or does not get healthy.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    document_root = resolve_document_root(document_root)
    executable = server_executable(venv_dir)
    if not executable.exists():
        raise LabelStudioServerError(
            f"Label Studio is not installed at {executable.parent.parent}; run `bash .ci/install_labelstudio.sh` "
            "or labeling.labelstudio_server.install_server()"
        )
    port = free_port(host) if port is None else int(port)
    if not port_is_free(port, host):
        raise LabelStudioServerError(f"port {port} on {host} is already in use; pick another port")
    if template is not None and Path(template).exists():
        extract_template(template, data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    token = token or secrets.token_hex(20)  # LS keys are 40 characters
    password = password or secrets.token_urlsafe(12)
    log_path = data_dir / LOG_FILE_NAME
    env = server_environment(
        data_dir=data_dir, document_root=document_root, username=username, password=password, token=token
    )
    command = [
        str(executable), "start", "--no-browser", "--internal-host", host, "--port", str(port),
        "--data-dir", str(data_dir), "--enable-legacy-api-token",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(data_dir),  # LS auto-detects a "mydata" dir in its cwd: give it one we own
            start_new_session=True,
        )
    _CHILDREN[process.pid] = process
    url = f"http://{host}:{port}"
    try:
        _wait_until_serving(process=process, log_path=log_path, host=host, port=port, timeout_s=timeout_s)
        if not token_works(url, token):
            raise LabelStudioServerError(
                f"Label Studio at {url} is up but refuses the admin token: data dir {data_dir} was initialised "
                "with another token (LABEL_STUDIO_USER_TOKEN applies only when the user is first created); "
                f"pass that token, or use a new data dir"
            )
    except BaseException:
        stop_server(process.pid)
        raise
    server = RunningServer(
        url=url, token=token, pid=process.pid, data_dir=data_dir, log_path=log_path,
        username=username, password=password, document_root=str(document_root),
    )  # fmt: skip
    write_state(server)
    return server


def _wait_until_serving(*, process: subprocess.Popen, log_path: Path, host: str, port: int, timeout_s: float) -> None:
    url = f"http://{host}:{port}"
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    deadline = time.monotonic() + timeout_s
    announced_port: int | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LabelStudioServerError(
                f"Label Studio exited with code {process.returncode} before it was ready; log {log_path}:\n"
                + _log_tail(log_path)
            )
        if announced_port is None:
            with open(log_path, "rb") as log:
                log.seek(log_offset)
                match = _STARTED_AT_RE.search(log.read().decode("utf-8", "replace"))
            if match:
                announced_port = int(match.group(2))
                if announced_port != port:
                    raise LabelStudioServerError(
                        f"port {port} was taken, so Label Studio silently moved to {announced_port}; "
                        f"stopped it: choose a free port"
                    )
        # Only trust /health once our own process said where it listens: on a busy port another server answers.
        if announced_port == port and health_ok(url):
            return
        time.sleep(0.5)
    raise LabelStudioServerError(f"Label Studio did not answer {url}/health within {timeout_s:.0f} s; log {log_path}")


def _log_tail(log_path: Path, n_chars: int = 3000) -> str:
    try:
        return log_path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return ""


def _pid_is_label_studio(pid: int, data_dir: Path | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # a recycled pid must not be killed
        try:
            arguments = cmdline.read_bytes().split(b"\0")
        except OSError:
            return False
        if not any(b"label-studio" in argument for argument in arguments):
            return False
        return data_dir is None or str(data_dir).encode() in arguments
    return True


def stop_server(server: RunningServer | int, *, timeout_s: float = 20.0) -> bool:
    """SIGTERM the server by pid (SIGKILL after timeout_s); True if it was running."""
    pid = server.pid if isinstance(server, RunningServer) else int(server)
    data_dir = Path(server.data_dir) if isinstance(server, RunningServer) else None
    child = _CHILDREN.pop(pid, None)
    was_running = False
    if child is not None:
        if child.poll() is None:
            was_running = True
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=10)
    elif _pid_is_label_studio(pid, data_dir):
        was_running = True
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _pid_is_label_studio(pid, data_dir):
            time.sleep(0.2)
        if _pid_is_label_studio(pid, data_dir):
            os.kill(pid, signal.SIGKILL)
    # The state file stays: it keeps the admin token for the next start on this data dir (the token is applied
    # only when the admin is first created); a dead pid in it is never mistaken for a running server.
    return was_running


def add_user(
    *,
    data_dir: Path | str,
    username: str,
    password: str,
    token: str,
    venv_dir: Path | str | None = None,
) -> None:
    """Another login (an annotator) with its own legacy token, in the server's organisation.

    `label-studio init` on the same data dir; safe while the server runs (SQLite). An existing user is kept
    as it is (its token is not changed).
    """
    data_dir = Path(data_dir).expanduser().resolve()
    executable = server_executable(venv_dir)
    if not executable.exists():
        raise LabelStudioServerError(f"Label Studio is not installed at {executable.parent.parent}")
    result = subprocess.run(
        # name=value: a generated password may start with "-" (token_urlsafe: 1 in 64), which argparse would take
        # for an option and fail the call
        [str(executable), "init", "--quiet", "--data-dir", str(data_dir), f"--username={username}",
         f"--password={password}", f"--user-token={token}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=str(data_dir),
        env=server_environment(data_dir=data_dir),
    )  # fmt: skip
    if result.returncode != 0:
        raise LabelStudioServerError(f"could not add user {username}: {(result.stderr or result.stdout)[-2000:]}")


# ---------------------------------------------------------------------------------------------------------
# state file: "already running" detection for `loop labelstudio up`


def write_state(server: RunningServer) -> Path:
    path = Path(server.data_dir) / STATE_FILE_NAME
    state = asdict(server)
    state.pop("already_running")
    state["data_dir"] = str(server.data_dir)
    state["log_path"] = str(server.log_path)
    path.write_text(json.dumps(state, indent=2))
    path.chmod(0o600)  # it holds the admin's token and password
    return path


def read_state(data_dir: Path | str) -> RunningServer | None:
    path = Path(data_dir).expanduser() / STATE_FILE_NAME
    try:
        state = json.loads(path.read_text())
        state["data_dir"] = Path(state["data_dir"])
        state["log_path"] = Path(state["log_path"])
        return RunningServer(**state)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_server(data_dir: Path | str) -> RunningServer | None:
    """The server recorded in data_dir's state file if its pid is alive and it answers /health, else None."""
    state = read_state(data_dir)
    if state is None or not _pid_is_label_studio(state.pid, state.data_dir) or not health_ok(state.url):
        return None
    return state


def labelstudio_up(
    *,
    data_dir: Path | str,
    port: int = DEFAULT_PORT,
    username: str = DEFAULT_USERNAME,
    password: str | None = None,
    token: str | None = None,
    document_root: str | None = None,
    venv_dir: Path | str | None = None,
) -> RunningServer:
    """Install (if needed) and start a local Label Studio; prints nothing, returns what to print.

    Already running for this data dir -> that server, with already_running=True. A data dir that was set up
    before keeps its admin token (from the state file) unless another token is given, and its document root unless
    another is given or LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT names one: the loop reads that variable too, so a server
    kept on its old root would be sent image links it answers with 404.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    current = running_server(data_dir)
    if current is not None:
        return RunningServer(**{**asdict(current), "already_running": True})
    previous = read_state(data_dir)  # stopped earlier: same admin, same token
    if previous is not None:
        token = token or previous.token
        password = password or previous.password
        document_root = document_root or os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT") or previous.document_root
    install_server(venv_dir=venv_dir)
    return start_server(
        data_dir=data_dir, port=port, username=username, password=password, token=token,
        document_root=document_root, venv_dir=venv_dir,
    )  # fmt: skip


def labelstudio_down(*, data_dir: Path | str) -> bool:
    """Stop the server recorded in data_dir's state file; False if none was running."""
    state = running_server(data_dir)
    if state is None:
        return False
    return stop_server(state)


# ---------------------------------------------------------------------------------------------------------
# template: a migrated data dir packed once, so each fresh data dir starts in seconds instead of ~30 s


def make_template(*, template_path: Path | str, venv_dir: Path | str | None = None) -> Path:
    """Run the migrations once in a scratch data dir (no users, no organisation) and tar it to template_path.

    No user is in it, so the admin, its token and the organisation (with legacy tokens enabled) are created
    by the first start_server() on a copy, exactly as on a fresh data dir.
    """
    template_path = Path(template_path).expanduser().resolve()
    executable = server_executable(venv_dir)
    if not executable.exists():
        raise LabelStudioServerError(f"Label Studio is not installed at {executable.parent.parent}")
    with tempfile.TemporaryDirectory(prefix="ls-template-") as scratch:
        data_dir = Path(scratch) / "data"
        data_dir.mkdir()
        env = server_environment(data_dir=data_dir)
        result = subprocess.run(
            [str(executable), "init", "--quiet", "--data-dir", str(data_dir)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, cwd=str(data_dir),
        )  # fmt: skip
        if result.returncode != 0:
            raise LabelStudioServerError(f"`label-studio init` failed: {(result.stderr or result.stdout)[-2000:]}")
        template_path.parent.mkdir(parents=True, exist_ok=True)
        partial = template_path.with_suffix(".partial")
        with tarfile.open(partial, "w:gz") as archive:
            for child in sorted(data_dir.iterdir()):
                archive.add(child, arcname=child.name)
        partial.replace(template_path)
    return template_path


def default_template_path() -> Path:
    """$DEFECT_LOOP_LABELSTUDIO_TEMPLATE, else a tar next to the server's venv."""
    configured = os.environ.get("DEFECT_LOOP_LABELSTUDIO_TEMPLATE")
    if configured:
        return Path(configured).expanduser()
    return default_venv_dir().parent / f"labelstudio-{LABEL_STUDIO_VERSION}-migrated-data.tar.gz"


# ---------------------------------------------------------------------------------------------------------
# command line (stdlib only): used by .ci/install_labelstudio.sh


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1-65535)")
    return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labeling.labelstudio_server", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("install", help=f"install label-studio=={LABEL_STUDIO_VERSION} into its own venv")
    install.add_argument("--venv", default=None)
    install.add_argument("--no-uv", action="store_true")
    install.add_argument("--template", default=None, help="also write a pre-migrated data dir tar here")
    up = commands.add_parser("up", help="start a local server (prints URL and token)")
    up.add_argument("--data-dir", required=True)
    up.add_argument("--port", type=_port, default=DEFAULT_PORT, metavar="1-65535")
    up.add_argument("--username", default=DEFAULT_USERNAME)
    up.add_argument("--document-root", default=None, help="default: env LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, else /")
    down = commands.add_parser("down", help="stop the server of a data dir")
    down.add_argument("--data-dir", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            started = time.monotonic()
            venv = install_server(venv_dir=args.venv, use_uv=not args.no_uv)
            print(f"label-studio {installed_version(venv)} in {venv} ({time.monotonic() - started:.1f} s)")
            if args.template:
                template = Path(args.template).expanduser()
                if template.exists():
                    print(f"template {template} already there")
                else:
                    started = time.monotonic()
                    make_template(template_path=template, venv_dir=venv)
                    print(f"template {template} written ({time.monotonic() - started:.1f} s)")
        elif args.command == "up":
            server = labelstudio_up(
                data_dir=args.data_dir, port=args.port, username=args.username, document_root=args.document_root
            )
            print(f"{'already running' if server.already_running else 'started'}: {server.url} (pid {server.pid})")
            print(f"LABEL_STUDIO_URL={server.url}\nLABEL_STUDIO_API_KEY={server.token}")
        elif args.command == "down":
            print("stopped" if labelstudio_down(data_dir=args.data_dir) else "was not running")
    except LabelStudioServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
