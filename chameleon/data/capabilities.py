"""What the configured store really does, probed at job and server start: exclusive create
(`If-None-Match: *`), checksums on uploads, checksums on multipart parts.

    caps = check_store(store, single_writer=cfg.storage.single_writer)   # the job, forget
    caps = check_store(store, role="server")                             # a serving replica

The run's protections against two writers (the manifest is created exclusively; a job spec is
never replaced) rest on exclusive create. A server that ignores `If-None-Match` silently lets a
second writer replace a manifest, so a writer refuses such a store (`StoreCapabilityError`)
unless the user opts into single-writer mode (`storage.single_writer: true`, or
`--single-writer`): then an exclusive create is a HEAD before the write, which is only safe when
one writer at a time uses the store. A server that does not implement checksums (501, or a
refusal of the header) gets uploads without them, with a warning (readers still check every file
against the manifest's SHA-256); one that accepts a wrong checksum is reported as `ignored`.
A serving replica never writes: it probes only to report (read-only credentials are fine).

The probe writes and deletes a few small objects under `_probe/<random>/` (one multipart
upload is started and aborted), about ten requests.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from chameleon.data.s3_protocol import error_code, is_transient, is_unsupported, sha256_b64
from chameleon.data.storage import LocalStore, S3Store, Store, StoreAccessError, StoreError

log = logging.getLogger(__name__)

Support = Literal["enforced", "verified", "ignored", "unsupported", "not probed"]
PROBE_PREFIX = "_probe"
SINGLE_WRITER_HELP = (
    "set storage.single_writer: true (or pass --single-writer) to use it anyway with only one "
    "writer (job or forget) at a time"
)

# A server that understood the checksum and found it wrong.
_CHECKSUM_MISMATCH = {
    "BadDigest",
    "XAmzContentChecksumMismatch",
    "InvalidDigest",
    "XAmzContentSHA256Mismatch",
}
_RETRY_409 = {"ConditionalRequestConflict", "OperationAborted"}
# A server that refuses the checksum header itself.
_CHECKSUM_REFUSED = {"InvalidArgument", "InvalidRequest", "NotImplemented"}


class StoreCapabilityError(StoreError):
    """The store lacks a capability a writer needs, and no opt-in allows it."""


@dataclass(frozen=True)
class StoreCapabilities:
    conditional_create: Support
    """`enforced`: a second `If-None-Match: *` create of a key is refused; `ignored`: it replaced
    the object; `unsupported`: the header is refused (501)."""
    checksums: Support
    """`verified`: a wrong `ChecksumSHA256` is refused; `ignored`: accepted; `unsupported`: refused."""
    multipart_checksums: Support
    """The same for a multipart part (`UploadPart` with `ChecksumSHA256`)."""
    note: str = ""

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items() if v)


def probe_store(store: Store) -> StoreCapabilities:
    """Probe `store` (see the module doc). A local directory needs no probe: its exclusive create
    is a hard link, and there is no transfer to check."""
    if isinstance(store, LocalStore):
        return StoreCapabilities("enforced", "not probed", "not probed", "local directory")
    if not isinstance(store, S3Store):
        return StoreCapabilities("not probed", "not probed", "not probed", type(store).__name__)
    try:
        # Transient failures (an outage at start) are retried like any request of the store.
        return store._call(store.uri, lambda: _probe_s3(store))
    except StoreError:
        raise
    except Exception as exc:
        raise store._translate(exc, store.uri) from exc


def _probe_s3(store: S3Store) -> StoreCapabilities:
    prefix = f"{PROBE_PREFIX}/{uuid.uuid4().hex[:12]}"
    client, bucket = store.client, store.bucket
    keys = [
        store.s3_key(f"{prefix}/{name}") for name in ("create", "checksum-ok", "checksum-bad", "multipart")
    ]
    try:
        return StoreCapabilities(
            _probe_create(store, client, bucket, keys[0]),
            _probe_checksums(client, bucket, keys[1], keys[2]),
            _probe_multipart(client, bucket, keys[3]),
        )
    finally:
        for key in keys:
            with contextlib.suppress(Exception):
                client.delete_object(Bucket=bucket, Key=key)


def _answer(fn: Callable[[], Any]) -> str:
    """'' when `fn()` succeeded, else the error code it failed with (other errors propagate)."""
    from botocore.exceptions import ClientError

    try:
        fn()
        return ""
    except ClientError as exc:
        code = error_code(exc)
        if is_transient(exc) and code not in _CHECKSUM_MISMATCH | _RETRY_409:
            raise  # an outage, not an answer: retried around the whole probe
        return "NotImplemented" if is_unsupported(exc) else code or "unknown"


def _raise_unexpected(store: S3Store, code: str, what: str) -> None:
    if code in ("AccessDenied", "403", "Forbidden"):
        raise StoreAccessError(f"S3 refused the storage probe's {what} at {store.uri} ({code})")
    raise StoreError(f"the storage probe's {what} at {store.uri} failed unexpectedly ({code})")


def _probe_create(store: S3Store, client: Any, bucket: str, key: str) -> Support:
    def create(body: bytes) -> str:
        for attempt in range(5):  # a 409 (a conflicting request in progress): AWS says retry
            code = _answer(lambda: client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*"))
            if code not in _RETRY_409:
                break
            time.sleep(0.2 * 2**attempt)
        return code

    first = create(b"first writer")
    if first == "NotImplemented":
        return "unsupported"
    if first:
        _raise_unexpected(store, first, "exclusive create")
    second = create(b"second writer")
    if second in ("PreconditionFailed", "412"):
        return "enforced"
    if second == "NotImplemented":
        return "unsupported"
    if second:
        _raise_unexpected(store, second, "second exclusive create")
    return "ignored"


def _checksum_answer(code: str) -> Support | None:
    if code in _CHECKSUM_REFUSED:
        return "unsupported"
    return None


def _probe_checksums(client: Any, bucket: str, ok_key: str, bad_key: str) -> Support:
    body = b"chameleon checksum probe"
    good = _answer(
        lambda: client.put_object(Bucket=bucket, Key=ok_key, Body=body, ChecksumSHA256=sha256_b64(body))
    )
    if good:
        return _checksum_answer(good) or "unsupported"
    wrong = sha256_b64(b"not the body")
    bad = _answer(lambda: client.put_object(Bucket=bucket, Key=bad_key, Body=body, ChecksumSHA256=wrong))
    if not bad:
        return "ignored"
    return "verified" if bad in _CHECKSUM_MISMATCH else _checksum_answer(bad) or "verified"


def _probe_multipart(client: Any, bucket: str, key: str) -> Support:
    from botocore.exceptions import ClientError

    try:
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256")[
            "UploadId"
        ]
    except ClientError:
        return "unsupported"
    try:
        body = b"chameleon multipart checksum probe"
        part = {"Bucket": bucket, "Key": key, "UploadId": upload_id, "Body": body}
        good = _answer(lambda: client.upload_part(**part, PartNumber=1, ChecksumSHA256=sha256_b64(body)))
        if good:
            return "unsupported"
        bad = _answer(lambda: client.upload_part(**part, PartNumber=2, ChecksumSHA256=sha256_b64(b"x")))
        if not bad:
            return "ignored"
        return "verified" if bad in _CHECKSUM_MISMATCH else _checksum_answer(bad) or "verified"
    finally:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)


def check_store(
    store: Store, *, role: Literal["writer", "server"] = "writer", single_writer: bool = False
) -> StoreCapabilities:
    """Probe `store` and apply the policy of the module doc: a writer refuses a store without
    exclusive create unless `single_writer`; checksums are turned off where unsupported. Logs the
    result and returns it."""
    if role == "server":
        try:
            caps = probe_store(store)
        except StoreError as exc:  # read-only credentials are enough to serve; an outage is not ours
            caps = StoreCapabilities("not probed", "not probed", "not probed", str(exc)[:300])
        log.info("store %s: %s", store.uri, caps.summary())
        return caps
    caps = probe_store(store)
    if caps.conditional_create in ("ignored", "unsupported"):
        what = (
            f"S3 at {store.uri} {'ignores' if caps.conditional_create == 'ignored' else 'does not implement'}"
        )
        if not single_writer:
            raise StoreCapabilityError(
                f"{what} conditional writes (If-None-Match: *): a second writer would silently replace a "
                f"committed run's manifest; {SINGLE_WRITER_HELP}"
            )
        log.warning("%s conditional writes; single-writer mode: never run two writers at once", what)
        if isinstance(store, S3Store):
            store.exclusive_create = "emulated"
    if isinstance(store, S3Store):
        if caps.checksums == "unsupported" or caps.multipart_checksums == "unsupported":
            log.warning("S3 at %s does not implement upload checksums: uploading without them", store.uri)
            store.checksums = False
        elif "ignored" in (caps.checksums, caps.multipart_checksums):
            log.warning(
                "S3 at %s accepts wrong checksums: a body damaged in transit is caught only when read",
                store.uri,
            )
    log.info("store %s: %s", store.uri, caps.summary())
    return caps
