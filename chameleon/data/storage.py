"""One small interface over local directories and `s3://bucket/prefix`.

    store = open_store("s3://bucket/root")          # or "file:///data/root", or "/data/root"
    store.put_json("runs/r1/manifest.json", {...})
    store.child("runs/r1").get_parquet("assignments.parquet")

Keys are relative, `/`-separated paths below the store's root. They are validated on every call
(no `..`, no absolute paths, no backslashes, no empty segments, no control characters): parts of
keys come from user ids, and no id may address anything outside the store.

Errors: a missing key raises `StoreKeyError` (a `FileNotFoundError`) naming the full URI; wrong
credentials raise `StoreAccessError` (a `PermissionError`); a missing bucket raises
`BucketNotFoundError`. None of these is retried by callers: they are configuration problems.
`put_bytes(..., if_absent=True)` is an exclusive create (S3 `If-None-Match: *`, a hard link on a
local disk): when the key exists it raises `StoreConflictError` and leaves the object alone.
Transient S3 failures (connection errors, timeouts, 5xx, throttling, a 409 conflicting operation)
are retried by botocore and then by `S3Store` itself, with backoff, for up to `retry_deadline_s`;
past it they raise `StoreUnavailableError`. A 501 (`NotImplemented`) is not an outage: it raises
`StoreUnsupportedError` at once. What a server supports (exclusive create, checksums) is probed at
job and server start by `chameleon.data.capabilities`, never guessed from errors.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from chameleon.data.s3_protocol import error_code, is_transient, is_unsupported, put_multipart, sha256_b64

ENDPOINT_ENV_VARS = ("CHAMELEON_S3_ENDPOINT", "AWS_ENDPOINT_URL")
"""Where `S3Store` looks for the endpoint when none is given (first set wins)."""

_TMP_SUFFIX = ".chameleon-tmp"
_MULTIPART_THRESHOLD = 64 * 2**20
"""Uploads above this size go in parts (user shards and pairs of big runs): `s3_protocol.put_multipart`."""
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreError(Exception):
    """Base class of storage errors."""


class StoreKeyError(StoreError, FileNotFoundError):
    """The key does not exist; the message names the full URI."""


class StoreAccessError(StoreError, PermissionError):
    """The storage refused the credentials or the operation."""


class BucketNotFoundError(StoreError):
    """The bucket does not exist (and the store was not asked to create it)."""


class StoreConflictError(StoreError):
    """An exclusive create (`if_absent=True`) found the key already there."""


class StoreUnavailableError(StoreError):
    """The store kept failing with transient errors for longer than its retry deadline."""


class StoreUnsupportedError(StoreError):
    """The server does not implement an operation or header this store sent (HTTP 501)."""


# -- keys ----------------------------------------------------------------------------------------


def validate_key(key: str, *, allow_empty: bool = False, what: str = "key") -> str:
    """Return `key` when it is a safe relative path; raise ValueError with the reason otherwise.

    A single trailing `/` is allowed only with `allow_empty` (listing prefixes such as `runs/`).
    """
    if not isinstance(key, str):
        raise ValueError(f"{what} must be a string, got {type(key).__name__}")
    if key == "":
        if allow_empty:
            return key
        raise ValueError(f"{what} is empty")
    body = key[:-1] if allow_empty and key.endswith("/") else key
    if body.startswith("/"):
        raise ValueError(f"{what} {key!r} is absolute (keys are relative to the store root)")
    if "\\" in body:
        raise ValueError(f"{what} {key!r} contains a backslash")
    if any(ord(c) < 32 or ord(c) == 127 for c in body):
        raise ValueError(f"{what} {key!r} contains a control character")
    if len(key.encode("utf-8")) > 1024:
        raise ValueError(f"{what} is longer than 1024 bytes")
    for segment in body.split("/"):
        if segment == "":
            raise ValueError(f"{what} {key!r} has an empty path segment")
        if segment in (".", ".."):
            raise ValueError(f"{what} {key!r} contains a {segment!r} segment")
        if segment.endswith(_TMP_SUFFIX):
            raise ValueError(f"{what} {key!r} ends with the reserved suffix {_TMP_SUFFIX!r}")
    return key


def _child_prefix(prefix: str) -> str:
    """A validated sub-root for `child()`: one trailing `/` is allowed, nothing else sloppy."""
    return validate_key(prefix[:-1] if prefix.endswith("/") else prefix, what="prefix")


def join_key(*parts: str) -> str:
    """Join non-empty key parts with `/`."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


# -- the interface -------------------------------------------------------------------------------


class Store(abc.ABC):
    """A flat key → bytes store rooted at `uri`, plus typed helpers built on bytes."""

    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """The root, e.g. `s3://bucket/prefix` or `file:///abs/path`."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Write `data` at `key`, replacing any previous object. Readers see all or nothing.

        With `if_absent`, only create: `StoreConflictError` when the key exists (two writers can
        never both create it). A retried create whose first try landed is not a conflict."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The bytes at `key`; `StoreKeyError` when there are none."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Every key (recursively) that starts with `prefix`, relative to the root, sorted.

        `prefix` is a plain string prefix, as in S3: `runs/` lists a folder, `runs/r` also matches
        `runs/r1/...` and `runs/r2/...`.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error (as in S3)."""

    @abc.abstractmethod
    def child(self, prefix: str) -> Store:
        """A store rooted at `prefix` below this one."""

    def key_uri(self, key: str) -> str:
        """The full URI of `key` (for messages and logs)."""
        return self.uri.rstrip("/") + "/" + key

    # Typed helpers: all go through bytes, so every backend behaves the same.

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def put_json(self, key: str, obj: Any) -> None:
        self.put_text(key, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_parquet(self, key: str, table: pa.Table) -> None:
        self.put_bytes(key, parquet_bytes(table))

    def get_parquet(self, key: str) -> pa.Table:
        return read_parquet_bytes(self.get_bytes(key))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialize a table to Parquet in memory."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def read_parquet_bytes(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))


# -- local directories ---------------------------------------------------------------------------


class LocalStore(Store):
    """A directory. Writes go to a temporary file in the same directory and are renamed into
    place (`os.replace` is atomic on POSIX), so a reader never sees a partial file."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                # link() fails when the name exists: an atomic, exclusive create of a complete file.
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    if path.read_bytes() != data:  # the same bytes: a retried create, as on S3
                        raise StoreConflictError(f"{self.key_uri(key)} already exists") from None
                finally:
                    tmp.unlink(missing_ok=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StoreKeyError(f"no such key: {self.key_uri(key)}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        validate_key(prefix, allow_empty=True, what="prefix")
        # Walk only the folder the prefix points into, then filter by the string prefix.
        folder = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not folder.is_dir():
            return []
        keys = [k for k in self._walk(folder) if k.startswith(prefix)]
        return sorted(keys)

    def _walk(self, folder: Path) -> Iterator[str]:
        for dirpath, _dirs, files in os.walk(folder):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.endswith(_TMP_SUFFIX):
                    continue  # a write in progress
                yield name if rel == "." else f"{rel}/{name}"

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self.root / _child_prefix(prefix))


# -- S3 ------------------------------------------------------------------------------------------

_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "403",
    "Forbidden",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
}


class _ClientSlot:
    """Where an `S3Store` and its children keep the one boto3 client they share (made on first
    use): a child made before that use still finds it, so a task that opens many children of a
    store it was handed pays for one client and one bucket check, not one per child."""

    def __init__(self) -> None:
        self.client: Any = None
        self.lock = threading.Lock()


class S3Store(Store):
    """Objects under `s3://bucket/prefix` through boto3.

    The endpoint comes from `endpoint_url`, else `CHAMELEON_S3_ENDPOINT`, else `AWS_ENDPOINT_URL`,
    else AWS. Credentials come from `access_key`/`secret_key`, else boto3's usual chain
    (environment, config files, instance roles). The boto3 client is created on first use and
    is not pickled, so a store can be shipped to Ray workers (explicit keys travel with it).
    On first use the bucket is checked once: missing → `BucketNotFoundError` (or created with
    `create_bucket=True`), refused credentials → `StoreAccessError`.

    Each call is retried by botocore (`max_attempts`, standard mode), then, while it keeps failing
    transiently, by the store itself with backoff for up to `retry_deadline_s` seconds (an outage
    shorter than that is ridden out; a longer one raises `StoreUnavailableError`). The default 0
    suits latency-bound readers such as serving; the batch job passes `storage.retry_deadline_s`. Uploads carry
    their SHA-256 (`ChecksumSHA256`; above `_MULTIPART_THRESHOLD`, every part its own) so the server
    refuses a body damaged in transit. `checksums` and `exclusive_create` are set from the startup
    probe (`chameleon.data.capabilities.check_store`).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        create_bucket: bool = False,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        retry_deadline_s: float = 0.0,
        checksums: bool = True,
    ) -> None:
        if not _BUCKET_RE.match(bucket or ""):
            raise ValueError(f"invalid S3 bucket name {bucket!r} (3-63 lowercase letters, digits, '.', '-')")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix, what="S3 prefix")
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url or next(
            (os.environ[v] for v in ENDPOINT_ENV_VARS if os.environ.get(v)), None
        )
        self.region = (
            region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
        self.access_key = access_key
        self.secret_key = secret_key
        self.session_token = session_token
        self.create_bucket = create_bucket
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retry_deadline_s = retry_deadline_s
        self.checksums = checksums
        """Send each upload's (and each part's) SHA-256; the startup probe turns it off on a server
        that does not implement checksums."""
        self.exclusive_create = "native"
        """`native`: `if_absent` sends `If-None-Match: *` and the server enforces it; `emulated`
        (single-writer mode on a server that does not enforce it): a HEAD before the write, which
        only protects against writers that run one after another."""
        self._shared = _ClientSlot()

    # Pickling: the client (sockets, locks) stays behind; the copy builds its own on first use.

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shared"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._shared = _ClientSlot()

    def __repr__(self) -> str:
        # Never the secret key.
        return f"S3Store({self.uri!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created, and the bucket checked, on first use)."""
        slot = self._shared
        if slot.client is None:
            with slot.lock:
                if slot.client is None:
                    client = self._make_client()
                    self._check_bucket(client)
                    slot.client = client
        return slot.client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            signature_version="s3v4",
            retries={"mode": "standard", "max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            # Custom endpoints (SeaweedFS, MinIO, moto on 127.0.0.1) have no per-bucket DNS names.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            # Newer botocore adds CRC checksums by default, which several S3-compatible servers reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session per store: boto3's default session is not safe to share across threads.
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            aws_session_token=self.session_token,
            config=config,
        )

    def _check_bucket(self, client: Any) -> None:
        from botocore.exceptions import ClientError

        try:
            client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            code = error_code(exc)
            if is_transient(exc):
                raise  # retried by the caller's `_call`
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise self._translate(exc, f"s3://{self.bucket}") from exc
        except Exception as exc:
            if is_transient(exc):
                raise
            raise self._translate(exc, f"s3://{self.bucket}") from exc
        if not self.create_bucket:
            raise BucketNotFoundError(
                f"bucket {self.bucket!r} does not exist at {self._where()} "
                "(create it, or pass create_bucket=True)"
            )
        try:
            client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            # Another process may have created it in between.
            if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._translate(exc, f"s3://{self.bucket}") from exc

    def _where(self) -> str:
        return self.endpoint_url or f"AWS ({self.region})"

    def _translate(self, exc: Exception, uri: str) -> Exception:
        """A storage error with a message a user can act on."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreAccessError(
                f"no S3 credentials for {uri} at {self._where()}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "or pass access_key/secret_key"
            )
        if isinstance(exc, EndpointConnectionError):
            return StoreError(f"cannot reach the S3 endpoint {self._where()} for {uri}: {exc}")
        if isinstance(exc, ClientError):
            code = error_code(exc)
            if code in _ACCESS_CODES:
                key_id = self.access_key or "(from the environment / boto3 config)"
                return StoreAccessError(
                    f"S3 refused access to {uri} at {self._where()} ({code}): check the credentials "
                    f"(access key id {key_id}) and the bucket's permissions"
                )
            if code in ("NoSuchBucket",):
                return BucketNotFoundError(f"bucket {self.bucket!r} does not exist at {self._where()}")
            if is_unsupported(exc):
                return StoreUnsupportedError(
                    f"S3 at {self._where()} does not implement a request made on {uri} ({code}, HTTP 501): "
                    "the storage probe at start (chameleon.data.capabilities) says which features it lacks"
                )
            return StoreError(f"S3 error on {uri} at {self._where()} ({code}): {exc}")
        return StoreError(f"S3 error on {uri} at {self._where()}: {exc}")

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, uri: str, fn: Callable[[], T]) -> T:
        """`fn()` (one S3 operation, itself retried by botocore), retried with backoff while it
        fails transiently and `retry_deadline_s` allows; other errors pass through untouched."""
        t0 = time.monotonic()
        delay, tries = 0.5, 0
        while True:
            tries += 1
            try:
                return fn()
            except StoreError:
                raise
            except Exception as exc:
                if not is_transient(exc) or self.retry_deadline_s <= 0:
                    raise  # translated by the caller
                waited = time.monotonic() - t0
                if waited + delay > self.retry_deadline_s:
                    raise StoreUnavailableError(
                        f"the S3 endpoint {self._where()} kept failing for {waited:.0f} s on {uri} "
                        f"({tries} tries; retry deadline {self.retry_deadline_s:g} s, "
                        f"storage.retry_deadline_s): {exc}"
                    ) from exc
                log.warning("S3 %s failed (%s); retrying in %.1f s", uri, exc, delay)
                time.sleep(delay)
                delay = min(2 * delay, 10.0)

    def s3_key(self, key: str) -> str:
        """The object key of a store key (the store's prefix added)."""
        return self._key(key)

    def _put_object(self, full: str, data: bytes, if_absent: bool) -> None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Body": data}
        if if_absent and self.exclusive_create == "native":
            args["IfNoneMatch"] = "*"
        if self.checksums:
            # The server checks the body against it (BadDigest on corruption in transit, retried).
            args["ChecksumSHA256"] = sha256_b64(data)
        self.client.put_object(**args)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        full, uri = self._key(key), self.key_uri(key)
        if if_absent and self.exclusive_create == "emulated" and self.exists(key):
            if self._sha256_or_none(key) == hashlib.sha256(data).hexdigest():
                return
            raise StoreConflictError(f"{uri} already exists")

        def put() -> None:
            if len(data) > _MULTIPART_THRESHOLD and not if_absent:
                put_multipart(self.client, self.bucket, full, data, checksums=self.checksums)
            else:
                self._put_object(full, data, if_absent)

        try:
            self._call(uri, put)
        except StoreError:
            raise
        except Exception as exc:
            if if_absent and error_code(exc) in ("PreconditionFailed", "412"):
                # A retried create whose first try landed finds its own bytes: not a conflict.
                if self._sha256_or_none(key) == hashlib.sha256(data).hexdigest():
                    return
                raise StoreConflictError(f"{uri} already exists") from None
            raise self._translate(exc, uri) from exc

    def _sha256_or_none(self, key: str) -> str | None:
        try:
            return hashlib.sha256(self.get_bytes(key)).hexdigest()
        except StoreKeyError:
            return None

    def get_bytes(self, key: str) -> bytes:
        full, uri = self._key(key), self.key_uri(key)
        try:
            return self._call(
                uri, lambda: self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
            )
        except StoreError:
            raise
        except Exception as exc:
            if error_code(exc) in _MISSING_KEY_CODES:
                raise StoreKeyError(f"no such key: {uri}") from None
            raise self._translate(exc, uri) from exc

    def exists(self, key: str) -> bool:
        full, uri = self._key(key), self.key_uri(key)
        try:
            self._call(uri, lambda: self.client.head_object(Bucket=self.bucket, Key=full))
            return True
        except StoreError:
            raise
        except Exception as exc:
            if error_code(exc) in _MISSING_KEY_CODES:
                return False
            raise self._translate(exc, uri) from exc

    def list(self, prefix: str = "") -> list[str]:
        validate_key(prefix, allow_empty=True, what="prefix")
        root = f"{self.prefix}/" if self.prefix else ""

        def list_all() -> list[str]:
            paginator = self.client.get_paginator("list_objects_v2")
            return [
                obj["Key"][len(root) :]
                for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix)
                for obj in page.get("Contents", [])
            ]

        try:
            keys = self._call(self.key_uri(prefix), list_all)
        except StoreError:
            raise
        except Exception as exc:
            raise self._translate(exc, self.key_uri(prefix)) from exc
        # Some servers list "folder" marker objects (`a/`); they are not keys.
        return sorted(k for k in keys if k and not k.endswith("/"))

    def delete(self, key: str) -> None:
        full, uri = self._key(key), self.key_uri(key)
        try:
            self._call(uri, lambda: self.client.delete_object(Bucket=self.bucket, Key=full))
        except StoreError:
            raise
        except Exception as exc:
            if error_code(exc) in _MISSING_KEY_CODES:
                return
            raise self._translate(exc, uri) from exc

    def child(self, prefix: str) -> S3Store:
        prefix = _child_prefix(prefix)
        # A shallow copy shares the client slot: one (thread-safe) client and one bucket check for
        # a store and all its children, even when the client is made after the copy.
        new = copy.copy(self)
        new.prefix = join_key(self.prefix, prefix)
        return new

    def __copy__(self) -> S3Store:
        # Not through `__getstate__`, which leaves the client behind for a pickled copy.
        new = object.__new__(S3Store)
        new.__dict__.update(self.__dict__)
        return new


# -- opening by URI ------------------------------------------------------------------------------


def open_store(uri: str | os.PathLike[str], **s3_options: Any) -> Store:
    """`s3://bucket/prefix` → `S3Store(bucket, prefix, **s3_options)`; `file:///path` or a plain
    path → `LocalStore` (S3 options are ignored there, so callers can pass the same options for
    any URI). Other schemes are refused."""
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri:
        raise ValueError("storage URI is empty")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"S3 URI {uri!r} has no bucket (expected s3://bucket/prefix)")
        # Not unquoted: S3 keys may contain '%' literally.
        return S3Store(parsed.netloc, parsed.path, **s3_options)
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI {uri!r} names a remote host")
        return LocalStore(unquote(parsed.path))
    # A single letter is a Windows drive, not a scheme.
    if scheme and len(scheme) > 1:
        raise ValueError(
            f"unsupported storage URI scheme {scheme!r} in {uri!r} (use s3://, file:// or a path)"
        )
    return LocalStore(uri)
