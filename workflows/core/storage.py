"""Run-directory storage: a local path or ``s3://bucket/prefix``, through pyarrow filesystems (s3fs for S3).

Every read and write of the driver and of Ray Data goes through ``resolve(uri)``, which
returns a pyarrow ``FileSystem`` plus the path inside it. The filesystem object travels to every
Ray actor and worker (pickled), so it carries settings only — the region and ``AWS_ENDPOINT_URL``
for S3-compatible servers such as MinIO — never credentials: each process resolves those itself
from the standard AWS chain (environment variables, a profile, the instance role), so temporary
credentials refresh on long runs and no key sits in a task argument or an object-store copy.

Small files (markers, configs, summaries) are written whole or not at all: locally to a temporary
file renamed over the target; on S3 a PUT already is. A torn or garbled JSON file is a one-line
error naming it and the fix (``read_json``).
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid

import pyarrow.fs as pafs

from workflows.core.errors import ConfigError, DataError


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def _s3(uri: str) -> tuple[pafs.FileSystem, str]:
    """s3fs (the fsspec S3 client) behind pyarrow's filesystem interface: it speaks to AWS and
    to S3-compatible servers alike. Its settings (region, endpoint) pickle to Ray workers; the
    credentials do not — botocore's default chain finds them in each process."""
    import s3fs

    kwargs = s3_settings()
    path = uri[len("s3://"):].rstrip("/")
    if not path:
        raise ConfigError(uri, "no bucket in the S3 address", "write s3://BUCKET/PREFIX")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **kwargs)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def s3_settings() -> dict:
    """The S3 client settings taken from this process's environment: endpoint and region only."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict = {"client_kwargs": {"region_name": region} if region else {}}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    return kwargs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``uri`` → (filesystem, path inside it)."""
    if is_remote(uri):
        return _s3(uri)
    if "://" in uri and not uri.startswith("file://"):
        raise ConfigError(uri, "unsupported storage scheme", "use a local path or s3://BUCKET/PREFIX")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_text(uri: str) -> str:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_json(uri: str, obj) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(uri: str, fix: str = "delete it and run the same command again"):
    """The JSON document at ``uri``; a torn or garbled file is a one-line ``DataError`` naming the file,
    what is wrong and ``fix``."""
    text = read_text(uri)
    try:
        return json.loads(text)
    except ValueError as e:
        problem = "is empty" if not text.strip() else f"is not valid JSON ({getattr(e, 'msg', e)}, " \
                                                     f"line {getattr(e, 'lineno', '?')})"
        raise DataError(f"{uri} {problem}: the file was cut short or edited — {fix}") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` whole or not at all: locally to a temporary file in the same folder, then renamed
    over ``uri`` (a reader or a crash never sees half a file); an S3 PUT is whole already."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if is_remote(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def delete(uri: str) -> None:
    """Remove a file or a whole directory; missing is fine."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files (as full URIs) directly or recursively under ``uri`` ending in ``suffix``, sorted;
    ``uri`` itself when it is such a file."""
    fs, path = resolve(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        return []
    if kind == pafs.FileType.File:
        return [uri] if path.endswith(suffix) else []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    rels = sorted(posixpath.relpath(i.path, path) for i in infos
                  if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return [join(uri, r) for r in rels]
