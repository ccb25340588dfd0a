"""What an S3-compatible server's answers mean, and the checksummed multipart upload.

`S3Store` (`chameleon.data.storage`) retries what `is_transient` says is worth retrying, and
raises at once what `is_unsupported` says no retry can help (HTTP 501). `put_multipart` sends
every part's SHA-256 and aborts the upload on any failure, so no incomplete upload keeps bytes
on the server (bytes a `chameleon forget` could not see).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PART_SIZE = 16 * 2**20
"""Size of each part (S3 allows 5 MiB to 5 GiB, at most 10,000 parts: objects up to 156 GiB)."""
PART_WORKERS = 4

TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "BadDigest",  # the body was damaged in transit: send it again
    # 409: another request on the same key was in progress; AWS says to retry (a retried exclusive
    # create then gets its 412, or finds its own bytes).
    "ConditionalRequestConflict",
    "OperationAborted",
}


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def http_status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    status = (
        response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) if isinstance(response, dict) else 0
    )
    return status if isinstance(status, int) else 0


def is_unsupported(exc: BaseException) -> bool:
    """The server does not implement what was asked (501 `NotImplemented`): no retry can help."""
    return error_code(exc) in ("NotImplemented", "501") or http_status(exc) == 501


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the endpoint was unreachable, slow, overloaded, failed on its side, or
    asked for a retry (409)."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return True
    if is_unsupported(exc):
        return False
    return error_code(exc) in TRANSIENT_CODES or http_status(exc) >= 500


def sha256_b64(data: bytes) -> str:
    """The `ChecksumSHA256` of a body: base64 of its SHA-256 digest."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def put_multipart(client: Any, bucket: str, key: str, data: bytes, *, checksums: bool) -> None:
    """Upload `data` in `PART_SIZE` parts, in parallel; with `checksums`, each part carries its
    own SHA-256 (the server refuses a damaged part) and the upload is a SHA-256 one. Aborted on
    any failure."""
    where = {"Bucket": bucket, "Key": key}
    algorithm = {"ChecksumAlgorithm": "SHA256"} if checksums else {}
    upload_id = client.create_multipart_upload(**where, **algorithm)["UploadId"]

    def put_part(n: int) -> dict[str, Any]:
        body = data[(n - 1) * PART_SIZE : n * PART_SIZE]
        part: dict[str, Any] = {"PartNumber": n}
        if checksums:
            part["ChecksumSHA256"] = sha256_b64(body)
        etag = client.upload_part(**where, UploadId=upload_id, Body=body, **part)["ETag"]
        return {"ETag": etag, **part}

    try:
        n_parts = max(1, -(-len(data) // PART_SIZE))
        with ThreadPoolExecutor(min(PART_WORKERS, n_parts)) as pool:
            parts = list(pool.map(put_part, range(1, n_parts + 1)))
        client.complete_multipart_upload(**where, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except BaseException:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(**where, UploadId=upload_id)
        raise
