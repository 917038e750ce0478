"""A real Flower federation on one machine: SuperLink, SuperNodes and ``flwr run`` as processes.

:class:`LocalFederation` starts a SuperLink and SuperNodes on the loopback interface
(ports chosen free at run time, a private ``FLWR_HOME``), optionally with TLS (a local CA
and a server certificate for ``127.0.0.1``/``localhost``, made with ``openssl``) and
SuperNode authentication (keys made with ``ssh-keygen``, registered with ``flwr supernode
register``), submits runs with ``flwr run``, stops them with ``flwr stop``, and ends every
process it started (SIGTERM to its process group, then SIGKILL) when it closes, also when
the code using it fails. Every command it runs is kept in :attr:`LocalFederation.commands`,
which is how chapter ``14_scaling_out_with_flower`` shows the commands of a deployment: the
ones that ran. :func:`write_app` writes the Flower App (``pyproject.toml``) around
:mod:`robustfl_lib.flower.apps` with a run config, and :func:`read_result` reads the final
model and history the ServerApp checkpointed.

A multi-machine deployment runs the same commands with the machines' addresses, the
SuperLink's certificate made for its public name (the SAN must match the address the
SuperNodes dial), and the files at absolute paths (Flower's connection file refuses
relative ones).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..federated import FLConfig, FLResult
from ..models import build_model
from .config import DEPLOYMENT_KEYS, DeploymentSettings, cached_dataset, config_from_run_config, settings_from_run_config
from .serverapp import CHECKPOINT_NAME

__all__ = ["LocalFederation", "FlowerRun", "write_app", "app_pyproject", "read_result", "free_port", "node_configs",
           "APP_COMPONENTS", "DEMO_RUN_CONFIG"]

#: The components of the robustfl Flower App.
APP_COMPONENTS = {"serverapp": "robustfl_lib.flower.apps:server_app", "clientapp": "robustfl_lib.flower.apps:client_app"}

#: The run config of the small federation that chapter 14 starts and ``tests/test_flower_deploy.py``
#: runs (one place, so that the text and the test cannot drift): three SuperNodes on digits with a
#: Dirichlet label skew, one of them Byzantine (ALIE with local knowledge), centered clipping with
#: f = 1, two rounds; each round waits at most two minutes, the run at most one for its nodes.
DEMO_RUN_CONFIG: dict[str, bool | int | float | str] = {
    "dataset": "digits", "num-clients": 3, "rounds": 2, "partition": "dirichlet", "alpha": 0.5, "lr": 0.3,
    "local-epochs": 1, "aggregator": "centered_clipping", "byzantine-fraction": 0.34, "byzantine-attack": "alie",
    "seed": 0, "checkpoint-every": 1, "round-timeout": 120.0, "wait-for-nodes": 60.0,
}


def node_configs(run_config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One SuperNode's ``--node-config`` per partition of ``run_config``: ``partition-id`` and, for
    the partitions the simulations make Byzantine (:func:`~robustfl_lib.flower.byzantine_clients`),
    ``byzantine=true``, so that a test federation attacks exactly as the simulation engine does with
    ``knowledge="local"``. (No ``num-partitions``: the apps take the number of clients from the run
    config, and a node config key that nothing reads would only mislead.)"""
    from .federation import byzantine_clients

    config = config_from_run_config(run_config)
    byzantine = set(byzantine_clients(config))
    return [{"partition-id": i, **({"byzantine": True} if i in byzantine else {})} for i in range(config.num_clients)]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise ValueError(f"a run config value must be a TOML scalar (bool, int, float, str), got {value!r}")


def app_pyproject(run_config: Mapping[str, Any], name: str = "robustfl-on-flower",
                  components: Mapping[str, str] = APP_COMPONENTS) -> str:
    """The ``pyproject.toml`` of a Flower App running ``components`` with ``run_config``
    (kebab-case FLConfig fields and deployment keys: :mod:`robustfl_lib.flower.config`)."""
    lines = ["[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
             "[project]", f'name = "{name}"', 'version = "1.0.0"',
             'description = "robustfl: robust aggregation and Byzantine clients as a Flower App"', 'license = "MIT"',
             'dependencies = ["robustfl[flower]"]', "", "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
             "[tool.flwr.app]", 'publisher = "robustfl"', "", "[tool.flwr.app.components]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in components.items()]
    lines += ["", "[tool.flwr.app.config]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in run_config.items()]
    return "\n".join(lines) + "\n"


def write_app(folder: str | os.PathLike, run_config: Mapping[str, Any], name: str = "robustfl-on-flower",
              components: Mapping[str, str] = APP_COMPONENTS, files: Mapping[str, str] | None = None) -> Path:
    """Write a Flower App to ``folder`` (its ``pyproject.toml``, plus ``files``: name -> text) and
    return the folder. The run config is checked first (:func:`config_from_run_config`); every
    deployment key (:data:`~robustfl_lib.flower.config.DEPLOYMENT_KEYS`) is written, at its default
    where ``run_config`` does not set it, since ``flwr run --run-config`` only overrides keys the
    pyproject has."""
    config_from_run_config(run_config)
    defaults = DeploymentSettings()
    run_config = {**{key: getattr(defaults, name) for key, name in DEPLOYMENT_KEYS.items()}, **run_config}
    settings_from_run_config(run_config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(app_pyproject(run_config, name, components))
    for fname, text in (files or {}).items():
        (folder / fname).write_text(text)
    return folder


def read_result(checkpoint_dir: str | os.PathLike, run_config: Mapping[str, Any]) -> FLResult:
    """The final model and history a deployed ServerApp saved in ``checkpoint_dir`` (loaded with
    ``weights_only=True``). ``byzantine`` is empty: a deployed server does not know who attacks."""
    from ..checkpoint import load_checkpoint

    config = config_from_run_config(run_config)
    saved = load_checkpoint(Path(checkpoint_dir) / CHECKPOINT_NAME)
    data = cached_dataset(config)
    model = build_model(config.model, data.input_shape, data.num_classes)
    model.load_state_dict(saved["model"])
    return FLResult(model=model, history=list(saved["history"]), config=config, byzantine=[])


@dataclass
class FlowerRun:
    """What ``flwr run`` printed and returned; ``run_id`` as the SuperLink numbered the run."""

    command: list[str]
    returncode: int | None
    output: str
    run_id: int | None
    seconds: float

    def ok(self) -> bool:
        return self.returncode == 0


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen
    log: Path
    command: list[str]
    node_config: dict[str, Any] = field(default_factory=dict)


class LocalFederation:
    """A SuperLink and its SuperNodes as processes on ``127.0.0.1`` (module docstring).

    ``workdir`` holds the certificates, keys, ``FLWR_HOME`` and one log per process.
    ``tls`` makes a local CA and a server certificate (SAN ``IP:127.0.0.1, DNS:localhost``)
    and starts the SuperLink with it; ``auth`` enables SuperNode authentication. Processes
    inherit this environment plus ``env`` (``OMP_NUM_THREADS=1`` by default, the thread count
    of Flower's simulation workers, so that the two runtimes do the same float arithmetic).
    Use it as a context manager: leaving the block ends every process it started.
    """

    def __init__(self, workdir: str | os.PathLike, tls: bool = False, auth: bool = False,
                 env: Mapping[str, str] | None = None, bin_dir: str | os.PathLike | None = None,
                 federation: str = "local") -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls, self.auth, self.federation = tls, auth, federation
        self.bin = Path(bin_dir) if bin_dir is not None else Path(sys.executable).parent
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_HOME": str(self.workdir / "flwr-home"),
                    "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.commands: list[str] = []
        self.processes: list[_Process] = []
        self.superlink: _Process | None = None
        self.nodes: list[_Process] = []

    # ------------------------------------------------------------------ commands
    def _tool(self, name: str) -> str:
        path = self.bin / name
        return str(path) if path.exists() else name

    def _run(self, command: Sequence[str], timeout: float = 60.0, check: bool = True,
             record: bool = True) -> subprocess.CompletedProcess:
        if record:
            self.commands.append(self._show(command))
        out = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, env=self.env,
                             cwd=self.workdir)
        if check and out.returncode != 0:
            raise RuntimeError(f"{self._show(command)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
        return out

    def _show(self, command: Sequence[str]) -> str:
        """The command as one would type it: tools by name, paths under the workdir relative to it."""
        words = [Path(c).name if c.startswith(str(self.bin)) else c for c in command]
        return shlex.join(words)

    def _start(self, name: str, command: Sequence[str], node_config: Mapping[str, Any] | None = None) -> _Process:
        self.commands.append(self._show(command))
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "w") as fh:  # the child keeps its own descriptor
            popen = subprocess.Popen(list(command), stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.workdir, start_new_session=True)
        proc = _Process(name, popen, log, list(command), dict(node_config or {}))
        self.processes.append(proc)
        return proc

    # ------------------------------------------------------------------ TLS and keys
    def make_certificates(self) -> dict[str, Path]:
        """A CA and a server certificate signed by it for ``127.0.0.1`` and ``localhost``."""
        d = self.workdir / "certificates"
        d.mkdir(exist_ok=True)
        (d / "server.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
        ssl = self._tool("openssl") if (self.bin / "openssl").exists() else "openssl"
        self._run([ssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                   "-days", "2", "-subj", "/CN=robustfl local CA", "-keyout", str(d / "ca.key"),
                   "-out", str(d / "ca.crt")])
        self._run([ssl, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                   "-subj", "/CN=127.0.0.1", "-keyout", str(d / "server.key"), "-out", str(d / "server.csr")])
        self._run([ssl, "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"), "-CAkey",
                   str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(d / "server.ext"),
                   "-out", str(d / "server.pem")])
        return {"ca": d / "ca.crt", "cert": d / "server.pem", "key": d / "server.key"}

    def make_node_key(self, name: str) -> tuple[Path, Path]:
        """An ECDSA P-384 key pair for a SuperNode (``ssh-keygen``): private key, public key."""
        d = self.workdir / "keys"
        d.mkdir(exist_ok=True)
        key = d / name
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        self._run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", name, "-f", str(key)])
        return key, Path(str(key) + ".pub")

    # ------------------------------------------------------------------ processes
    def start(self, timeout: float = 60.0) -> None:
        """Write the connection to ``FLWR_HOME/config.toml``, start the SuperLink, wait until it listens."""
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        command = [self._tool("flower-superlink"), "--port", str(self.port), "--disable-runtime-dependency-installation"]
        connection = [f"[superlink]", f'default = "{self.federation}"', "", f"[superlink.{self.federation}]",
                      f'address = "{self.address}"']
        if self.tls:
            certs = self.make_certificates()
            self.ca = certs["ca"]
            command += ["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
                        "--ssl-keyfile", str(certs["key"])]
            connection.append(f'root-certificates = "{certs["ca"]}"')  # Flower wants an absolute path here
        else:
            command.append("--insecure")
            connection.append("insecure = true")
        if self.auth:
            command.append("--enable-supernode-auth")
        (home / "config.toml").write_text("\n".join(connection) + "\n")
        self.superlink = self._start("superlink", command)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(self.superlink)
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the SuperLink did not listen on {self.address} within {timeout:g} s; see {self.superlink.log}")

    def _check_alive(self, proc: _Process) -> None:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {proc.log.read_text()[-2000:]}")

    def add_node(self, node_config: Mapping[str, Any], register: bool = True, name: str | None = None,
                 trust_ca: bool = True) -> _Process:
        """Start a SuperNode with ``node_config`` (``{"partition-id": 0, "byzantine": True}``).
        With authentication, its key is made and, if ``register``, registered first; an unregistered
        node is one the SuperLink must refuse. With TLS, the node checks the SuperLink's certificate
        against the local CA (``--root-certificates``); ``trust_ca=False`` leaves the flag out, so the
        node falls back to the system's CAs, which do not know the local one: the handshake must fail
        (``CERTIFICATE_VERIFY_FAILED``), as it would for a device given the wrong CA."""
        name = name or f"supernode-{len(self.nodes)}"
        command = [self._tool("flower-supernode"), "--superlink", self.address, "--port", str(free_port()),
                   "--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())]
        if self.tls:
            command += ["--root-certificates", str(self.ca)] if trust_ca else []
        else:
            command.append("--insecure")
        if self.auth:
            key, public = self.make_node_key(name)
            if register:
                self.flwr("supernode", "register", str(public), self.federation)
            command += ["--auth-supernode-private-key", str(key)]
        proc = self._start(name, command, node_config)
        self.nodes.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS`` against this federation (its ``FLWR_HOME``)."""
        return self._run([self._tool("flwr"), *args], timeout=timeout, check=check)

    def online_nodes(self) -> list[dict[str, Any]]:
        """The SuperNodes the SuperLink lists as online (``flwr supernode list --format json``)."""
        out = self._run([self._tool("flwr"), "supernode", "list", self.federation, "--format", "json"],
                        record=False, check=False)
        try:
            listed = json.loads(out.stdout)
        except json.JSONDecodeError:
            return []
        nodes = listed.get("nodes", listed) if isinstance(listed, dict) else listed
        return [n for n in nodes if str(n.get("status", "online")).lower() == "online"]

    def wait_for_nodes(self, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Wait until ``count`` SuperNodes are online; raise ``TimeoutError`` naming the logs otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.online_nodes()
            if len(nodes) >= count:
                return nodes
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(nodes)} of {count} SuperNodes online after {timeout:g} s; logs in "
                                   f"{self.workdir / 'logs'}")
            time.sleep(1.0)

    def run(self, app: str | os.PathLike, run_config: Mapping[str, Any] | None = None, timeout: float = 300.0,
            background: bool = False) -> FlowerRun | subprocess.Popen:
        """``flwr run APP FEDERATION --stream [--run-config ...]``: wait for it (at most ``timeout`` s,
        then ``flwr stop`` the run and raise ``TimeoutError``), or with ``background`` return the process
        (its output goes to ``logs/flwr-run-N.log``)."""
        command = [self._tool("flwr"), "run", str(Path(app).resolve()), self.federation, "--stream"]
        if run_config:
            command += ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())]
        if background:
            return self._start(f"flwr-run-{sum(p.name.startswith('flwr-run') for p in self.processes)}", command).popen
        self.commands.append(self._show(command))
        start = time.monotonic()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
                                cwd=self.workdir, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            output = proc.communicate()[0] if proc.stdout else ""
            run_id = _run_id(output)
            if run_id is not None:
                self.stop_run(run_id)
            raise TimeoutError(f"flwr run did not finish within {timeout:g} s (run {run_id} stopped):\n{output[-3000:]}")
        return FlowerRun(command, proc.returncode, output, _run_id(output), time.monotonic() - start)

    def stop_run(self, run_id: int) -> subprocess.CompletedProcess:
        """``flwr stop RUN_ID FEDERATION``: end a run on the SuperLink (interrupting ``flwr run`` does not)."""
        return self.flwr("stop", str(run_id), self.federation, check=False)

    def kill_node(self, node: _Process, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a SuperNode's process group (it and the ClientApp it runs), as a device that dies."""
        self.commands.append(f"kill -{signal.Signals(sig).name.removeprefix('SIG')} <pid of {node.name}>")
        try:
            os.killpg(node.popen.pid, sig)
        except ProcessLookupError:
            pass
        node.popen.wait(timeout=30)

    def log_of(self, proc: _Process) -> str:
        return proc.log.read_text(errors="replace")

    def node_id(self, node: _Process, timeout: float = 60.0) -> int:
        """The node id the SuperLink gave ``node``, as the SuperNode's own log states it."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(r"SuperNode ID: (\d+)", self.log_of(node))
            if match:
                return int(match.group(1))
            if node.popen.poll() is not None or time.monotonic() >= deadline:
                raise RuntimeError(f"{node.name} has no node id (exit {node.popen.poll()}): {self.log_of(node)[-1500:]}")
            time.sleep(0.2)

    def messages_received(self, node: _Process) -> int:
        """How many messages ``node`` has received so far (its log's "Receiving:" lines)."""
        return self.log_of(node).count("Receiving:")

    def close(self) -> None:
        """End every process started here: SIGTERM to each process group, SIGKILL after 10 s."""
        for proc in reversed(self.processes):
            _end_group(proc.popen)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _end_group(popen: subprocess.Popen, grace: float = 10.0) -> None:
    if popen.poll() is not None:
        _kill_group(popen.pid, signal.SIGKILL)  # children it left behind
        return
    _kill_group(popen.pid, signal.SIGTERM)
    try:
        popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(popen.pid, signal.SIGKILL)
    try:
        popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
        pass


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_RUN_ID = re.compile(r"[Ss]uccessfully started run (\d+)|run[_ ]id[\"']?\s*[:=]\s*(\d+)")


def _run_id(output: str) -> int | None:
    match = _RUN_ID.search(output or "")
    if match is None:
        return None
    return int(match.group(1) or match.group(2))
