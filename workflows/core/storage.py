"""Run-directory storage: a local path or ``s3://bucket/prefix``, through pyarrow filesystems (s3fs for S3).

Every read and write of the driver and of Ray Data goes through ``resolve(uri)``, which
returns a pyarrow ``FileSystem`` plus the path inside it. S3 settings come from the
standard AWS environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, and ``AWS_ENDPOINT_URL`` for S3-compatible servers such as MinIO); the
filesystem object carries them to Ray workers when it is pickled.
"""
from __future__ import annotations

import json
import os
import posixpath

import pyarrow.fs as pafs

from workflows.core.errors import ConfigError


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def _s3(uri: str) -> tuple[pafs.FileSystem, str]:
    """s3fs (the fsspec S3 client) behind pyarrow's filesystem interface: it speaks to AWS and
    to S3-compatible servers alike, and pickles its settings to Ray workers."""
    import s3fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict = {"client_kwargs": {"region_name": region} if region else {}}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        kwargs["token"] = os.environ.get("AWS_SESSION_TOKEN")
    path = uri[len("s3://"):].rstrip("/")
    if not path:
        raise ConfigError(uri, "no bucket in the S3 address", "write s3://BUCKET/PREFIX")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **kwargs)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


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
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def read_text(uri: str) -> str:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_json(uri: str, obj) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(uri: str):
    return json.loads(read_text(uri))


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def delete(uri: str) -> None:
    """Remove a file or a whole directory; missing is fine."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files (as full URIs) directly or recursively under ``uri`` ending in ``suffix``, sorted."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    rels = sorted(posixpath.relpath(i.path, path) for i in infos
                  if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return [join(uri, r) for r in rels]
