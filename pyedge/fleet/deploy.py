"""Flower's own deployment processes on one machine: TLS certificates, SuperNode keys, a
SuperLink, SuperNodes registered by key, and `flwr run` of the pyedge app. Used by
`pyedge fleet local` and the tests; on real boards the same commands run by hand (README).

Nothing here replaces a Flower mechanism: TLS is `flower-superlink --ssl-*` /
`flower-supernode --root-certificates`; who may join is `--enable-supernode-auth` plus
`flwr supernode register <public key>` (only registered keys are let in); settings go through
`--run-config` / `--node-config`.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from pyedge.fleet import APP_DIR


# --------------------------------------------------------------------------- credentials
def _write_private(path: Path, data: bytes) -> None:
    """A private key, created 0600 (never readable by others, not even until a chmod) and
    renamed into place: a kill leaves the old key or the new one."""
    from pyedge.checkpoint import atomic_write
    atomic_write(path, data, mode=0o600)


def make_certificates(folder, hosts=("127.0.0.1", "localhost")) -> dict[str, Path]:
    """A self-signed CA and a server certificate for `hosts` (IPs or DNS names), PEM files
    ca.crt, server.pem, server.key. For tests and trials; use your own PKI for real fleets."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    later = now + datetime.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pyedge fleet test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(later)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP384R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0]))]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(later)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))

    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["key"], key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.TraditionalOpenSSL,
                                                   serialization.NoEncryption()))
    return paths


def make_node_key(folder, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC (P-384) key pair in OpenSSH format, as Flower reads them:
    (<name> private key, <name>.pub public key, the one to register)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / name, folder / f"{name}.pub"
    _write_private(priv, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return priv, pub


def descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def peak_rss_mib(pid: int | str = "self") -> float:
    """VmHWM (peak resident set) of a running process or of this one, MiB; -1 when it is gone
    or there is no /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return -1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A Flower console script of this interpreter's environment (else the PATH's)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def node_config_arg(cfg: Mapping[str, object]) -> str:
    """--node-config's `k1="v" k2=3` form (strings quoted: TOML values)."""
    return " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in cfg.items())


# --------------------------------------------------------------------------- processes
class LocalFleet:
    """A SuperLink and SuperNodes as separate processes on loopback, TLS and node
    authentication on. Every process gets its own session (process group), so stopping or
    killing one node takes its ClientApp subprocess with it."""

    CONNECTION = "pyedge-fleet"

    def __init__(self, root, env: Mapping[str, str] | None = None, tls: bool = True,
                 auth: bool = True):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.tls, self.auth = tls, auth
        self.certs = make_certificates(self.root / "certificates") if tls else None
        self.flwr_home = self.root / "flwr-home"          # the flwr CLI's config
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        self.env["PYTHONUNBUFFERED"] = "1"
        # the SuperLink and SuperNodes start flower-superexec / flwr-clientapp by name
        bindir = str(Path(sys.executable).parent)
        self.env["PATH"] = bindir + os.pathsep + self.env.get("PATH", "")
        self.superlink: subprocess.Popen | None = None
        self.nodes: dict[str, subprocess.Popen] = {}
        self.port = None

    # --- helpers
    def _spawn(self, name: str, args: list[str], env: Mapping[str, str] | None = None
               ) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                env=dict(env or self._env_for(name)), start_new_session=True)

    def _env_for(self, name: str) -> dict[str, str]:
        env = dict(self.env)
        env["FLWR_HOME"] = str(self.root / f"home-{name}")  # each process its own app cache
        return env

    def log(self, name: str) -> str:
        p = self.root / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    # --- SuperLink
    def start_superlink(self, port: int | None = None) -> None:
        self.port = port or self.port or free_port()
        # state in a file (registered keys, nodes, runs), so a restarted SuperLink knows them
        args = [_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation",
                "--database", str(self.root / "superlink-state.db")]
        if self.tls:
            args += ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile",
                     str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"])]
        else:
            args += ["--insecure"]
        if self.auth:
            args += ["--enable-supernode-auth"]
        self.superlink = self._spawn("superlink", args)
        self._write_cli_config()
        self._wait_port(self.port, self.superlink, "superlink")

    def restart_superlink(self) -> None:
        """SIGKILLs the SuperLink (and the ServerApp it runs), starts it again on its port."""
        self.kill(self.superlink)
        self.start_superlink(self.port)

    def _wait_port(self, port: int, proc: subprocess.Popen, name: str, timeout=60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.log(name)[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not listen on {port} in {timeout:.0f} s")

    def _write_cli_config(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{self.CONNECTION}"', "",
                 f"[superlink.{self.CONNECTION}]", f'address = "127.0.0.1:{self.port}"']
        lines += [f'root-certificates = "{self.certs["ca"]}"'] if self.tls else ["insecure = true"]
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True
             ) -> subprocess.CompletedProcess:
        env = dict(self.env, FLWR_HOME=str(self.flwr_home))
        r = subprocess.run([_bin("flwr"), *args], cwd=self.root, env=env, capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({r.returncode}):\n"
                               f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    # --- SuperNodes
    def node_key(self, name: str, register: bool = True) -> Path:
        priv, pub = make_node_key(self.root / "keys", name)
        if register and self.auth:
            self.flwr("supernode", "register", str(pub), self.CONNECTION)
        return priv

    def start_supernode(self, name: str, node_config: Mapping[str, object], key: Path | None,
                        extra: list[str] = ()) -> subprocess.Popen:
        args = [_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--node-config", node_config_arg(node_config), "--port", str(free_port())]
        args += ["--root-certificates", str(self.certs["ca"])] if self.tls else ["--insecure"]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key)]
        proc = self._spawn(name, args + list(extra))
        self.nodes[name] = proc
        return proc

    # --- runs
    def run(self, run_config: Mapping[str, object] | None = None, app=APP_DIR,
            timeout: float = 120.0) -> str:
        """`flwr run <app> <connection> --run-config ...`; returns the run id."""
        args = ["run", str(app), self.CONNECTION, "--format", "json"]
        if run_config:
            args += ["--run-config", node_config_arg(run_config)]
        r = self.flwr(*args, timeout=timeout)
        import json
        out = r.stdout[r.stdout.find("{"):]
        return str(json.loads(out).get("run-id", ""))

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink sees online (`flwr supernode ls`)."""
        import json
        r = self.flwr("supernode", "ls", self.CONNECTION, "--format", "json", check=False)
        try:
            nodes = json.loads(r.stdout[r.stdout.find("{"):]).get("nodes", [])
        except ValueError:
            return 0
        return sum(1 for n in nodes if n.get("status") == "online")

    # --- stopping
    def kill(self, proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
        """Signals the process's group and every descendant (Flower starts the ClientApp /
        ServerApp processes in sessions of their own)."""
        if proc.poll() is None:
            for pid in descendants(proc.pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for proc in list(self.nodes.values()):
            self.kill(proc, signal.SIGTERM)
        if self.superlink is not None:
            self.kill(self.superlink, signal.SIGTERM)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
