"""Flower's own runtime, driven from Python: a Flower app folder for a run, SuperLink and SuperNode processes, and
``flwr run``. ``simulate`` uses it with a simulation SuperLink; the deployment test with a TLS SuperLink and
SuperNodes, as a user would start them by hand (the README lists those commands).

Every process gets its own ``FLWR_HOME`` (the Flower CLI's connections, installed apps, the SuperLink's state), so a
run never reads or writes the user's ``~/.flwr``. Runtime dependency installation is off: the apps import the
``nemo_layerfx`` already installed beside Flower, and nothing may download at run time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_layerfx.fl.task import FLConfig

COMPONENTS = {"serverapp": "nemo_layerfx.fl.server_app:app", "clientapp": "nemo_layerfx.fl.client_app:app"}


def executable(name: str) -> str:
    """A Flower command (``flwr``, ``flower-superlink``, ``flower-supernode``): beside this Python, else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"`{name}` not found beside {sys.executable} or on PATH: pip install "
                                f"'nemo_layerfx[federated]'")
    return found


def toml_value(v: Any) -> str:
    """A run-config value as TOML (strings as JSON strings, which TOML reads alike)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_app(cfg: FLConfig, folder: str | Path) -> Path:
    """A Flower app folder for ``cfg``: our ServerApp and ClientApp, with ``cfg`` as the app's run config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ['[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', '',
             '[project]', 'name = "layerfx-federated-dropout"', 'version = "1.0.0"',
             'description = "Federated dropout for NeMo Conformers (nemo_layerfx)"', 'license = "Apache-2.0"',
             'dependencies = []  # the installed nemo_layerfx[federated]', '',
             '[tool.hatch.build.targets.wheel]', 'packages = ["."]', '',
             '[tool.flwr.app]', 'publisher = "nemo_layerfx"', '', '[tool.flwr.app.components]',
             *(f'{k} = "{v}"' for k, v in COMPONENTS.items()), '', '[tool.flwr.app.config]',
             *(f"{k.replace('_', '-')} = {toml_value(v)}" for k, v in cfg.to_run_config().items())]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OWNER = "LAYERFX_OWNER_PID"  # the process a simulation belongs to: its ServerApp ends when that one is gone


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts as exited: a parent that never reaps must not keep it alive)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


_WATCHING: list[int] = []  # the pid already watching (a process calls watch_parents once per message)


def watch_parents() -> None:
    """In a ServerApp or ClientApp process: end it, and the processes in its group (Ray's, in a simulation), as soon as the
    process that launched it (Flower's SuperExec) or the one that started the simulation (``simulate``) is gone.
    Flower's own parent monitor misses a parent that died and was reparented to an init that never reaps it (a
    zombie looks alive), so a killed ``layerfx fl`` or SuperLink left its rounds running and checkpointing, and a
    killed SuperNode left its ClientApp retrying forever."""
    if os.getpid() in _WATCHING:
        return
    _WATCHING.append(os.getpid())
    watched = [os.getppid()] + ([int(os.environ[OWNER])] if os.environ.get(OWNER) else [])
    import threading

    def watch() -> None:
        while not any(process_gone(pid) for pid in watched):
            time.sleep(0.2)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="layerfx-parent-watch").start()


def flower_env(home: Path) -> dict[str, str]:
    """The environment for Flower's processes: our FLWR_HOME, no runtime dependency installation, and this Python's
    scripts first on PATH (the SuperLink and SuperNode start ``flower-superexec`` by name)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PATH": path}


@dataclass
class TLS:
    """Certificate files (PEM): the CA every party trusts, and the SuperLink's certificate and key."""

    ca: Path
    cert: Path
    key: Path


class Process:
    """A Flower process logging to a file. It stays in our process group, so a kill of the group ends it too; what
    it starts (SuperExec, ServerApp, ClientApp processes) runs in sessions of its own and exits when its parent is
    gone (Flower's parent monitor)."""

    def __init__(self, args: list[str], home: Path, log: Path, env: dict[str, str] | None = None):
        self.args, self.log = args, log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(args, env={**flower_env(home), **(env or {})}, stdout=f,
                                         stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.is_file() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Signal it and reap it (a parent monitor sees an unreaped process as alive)."""
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


def wait_for_port(port: int, proc: Process, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{what} exited ({proc.proc.returncode}):\n{proc.tail()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    proc.stop()
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s:\n{proc.tail()}")


def start_superlink(home: Path, *, simulation: bool, tls: TLS | None = None, port: int | None = None,
                    database: str = ":memory:", supernode_auth: bool = False, owned: bool = False
                    ) -> tuple[Process, int]:
    """``flower-superlink`` on 127.0.0.1 (one HTTP port for the Fleet, Control and Runtime APIs); returns it and its
    port. Without ``tls`` it runs ``--insecure``: right for a simulation SuperLink, which listens on loopback only
    and has no SuperNodes, and wrong for a deployment across machines. ``owned``: the run's ServerApp ends when this
    process is gone (``watch_parents``)."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [executable("flower-superlink"), "--port", str(port), "--database", database]
    if tls is None:
        args.append("--insecure")
    else:
        args += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
    args += ["--simulation"] if simulation else []
    args += ["--enable-supernode-auth"] if supernode_auth else []
    link = Process(args, home, home / f"superlink-{port}.log", {OWNER: str(os.getpid())} if owned else {})
    wait_for_port(port, link, "flower-superlink")
    return link, port


def connect(home: Path, name: str, port: int, tls: TLS | None = None) -> None:
    """Write the Flower CLI's connection ``name`` to the SuperLink at 127.0.0.1:``port`` into FLWR_HOME."""
    (home / "config.toml").write_text("\n".join([
        "[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "127.0.0.1:{port}"',
        f'root-certificates = "{tls.ca}"' if tls else "insecure = true"]) + "\n")


def flwr_run(app: Path, home: Path, connection: str, federation: dict[str, Any] | None = None,
             echo: bool = True, timeout: float | None = None) -> str:
    """``flwr run <app> <connection> --stream``: start the run and follow its log until it ends; returns the log.
    ``federation``: the simulation's settings (``num-supernodes``, ``client-resources-num-cpus``, …)."""
    args = [executable("flwr"), "run", str(app), connection, "--stream"]
    if federation:
        args += ["--federation-config", " ".join(f"{k}={toml_value(v)}" for k, v in federation.items())]
    proc = subprocess.Popen(args, env=flower_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write(line)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines)
    if proc.returncode != 0:
        raise RuntimeError(f"`flwr run` failed ({proc.returncode}):\n{text[-3000:]}")
    return text


def start_supernode(home: Path, superlink_port: int, partition: int, num_partitions: int, *, tls: TLS | None = None,
                    auth_key: Path | None = None) -> Process:
    """``flower-supernode`` for client ``partition`` of ``num_partitions`` (it trains on the corpus's
    ``partition``-th client manifest), connected to the SuperLink at 127.0.0.1:``superlink_port``; ``auth_key``: its
    private key (SSH format, NIST EC curve) when the SuperLink authenticates SuperNodes."""
    home.mkdir(parents=True, exist_ok=True)
    args = [executable("flower-supernode"), "--superlink", f"127.0.0.1:{superlink_port}", "--port", str(free_port()),
            "--node-config", f"partition-id={partition} num-partitions={num_partitions}"]
    args += ["--root-certificates", str(tls.ca)] if tls else ["--insecure"]
    args += ["--auth-supernode-private-key", str(auth_key)] if auth_key else []
    return Process(args, home, home / f"supernode-{partition}.log")


def supernode_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (ECDSA P-384, OpenSSH format, as ``ssh-keygen -t ecdsa -b 384``
    writes it): (private key, public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def flwr(home: Path, *args: str) -> str:
    """Another ``flwr`` command against FLWR_HOME's connections (``supernode register <key.pub>``, ``ls``, …)."""
    done = subprocess.run([executable("flwr"), *args], env=flower_env(home), capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"`flwr {' '.join(args)}` failed ({done.returncode}):\n{done.stdout[-2000:]}"
                           f"{done.stderr[-2000:]}")
    return done.stdout
