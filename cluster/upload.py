"""What a submitted job carries: the project's files, as git sees them, without run outputs, caches,
virtualenvs, model weights or anything that looks like a secret; measured before anything is uploaded,
and staged in a directory of their own so the upload is exactly the measured selection.

Secrets never travel, whatever git says: ``.env*``, cloud and SSH credential folders, key files, and
service-account JSON are left out and named (``Selection.left_out``). A symbolic link is followed only
when its target is inside the project; a link to a folder is followed once (links inside it are not), a
link that leaves the project or loops back on itself is left out with the reason.

Pure file logic (no Ray): ``select`` → ``check_size`` → ``stage``.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from workflows.core.errors import CaiError

UPLOAD_LIMIT = 100 * 1024 * 1024  # the Ray Jobs API refuses larger working_dir packages
# Never uploaded, even when git tracks them: run outputs, caches, environments, model weights.
ALWAYS_EXCLUDED_DIRS = ("runs", ".git", "__pycache__", ".venv", "venv", "env", ".pytest_cache", ".ruff_cache",
                        ".mypy_cache", ".ipynb_checkpoints", "build", "dist", "wandb", ".cache")
ALWAYS_EXCLUDED_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth", "*.ckpt", "*.onnx", "*.pyc",
                         "*.egg-info", ".DS_Store")
# Never uploaded, whatever git says: folders and files that hold credentials (the repository's
# .dockerignore keeps the same ones out of the image; a test holds the two to the same rules).
SECRET_DIRS = {".aws": "cloud credentials folder", ".ssh": "SSH folder", ".kube": "Kubernetes config folder",
               ".gnupg": "GnuPG keyring folder"}
SECRET_FILES = (
    (".env*", "environment file (may hold keys)"),
    (".netrc", "credentials file"), ("_netrc", "credentials file"), (".git-credentials", "credentials file"),
    (".pypirc", "package-index credentials"), (".npmrc", "package-registry credentials"),
    ("*.pem", "key or certificate file"), ("*.key", "key file"), ("*.p12", "key store"), ("*.pfx", "key store"),
    ("id_rsa*", "SSH key"), ("id_ed25519*", "SSH key"), ("id_ecdsa*", "SSH key"), ("id_dsa*", "SSH key"),
)
SERVICE_ACCOUNT = "service-account key (a private_key field)"
JSON_SCAN_LIMIT = 8 * 1024 * 1024  # a credentials JSON is small; bigger JSON files are data
class UploadError(CaiError):
    """The project cannot be uploaded as it is (too large, nothing to send)."""


@dataclass(frozen=True)
class Selection:
    root: Path
    files: tuple[str, ...]  # paths relative to root, '/'-separated, sorted
    sizes: tuple[int, ...]
    left_out: tuple[tuple[str, str], ...] = field(default=())  # (path, why): secrets and links, never sent

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def largest(self, n: int = 5) -> list[tuple[str, int]]:
        return sorted(zip(self.files, self.sizes), key=lambda x: -x[1])[:n]

    def digest(self) -> str:
        """Content hash of the selection: the same files and bytes give the same digest."""
        h = hashlib.sha256()
        for rel in self.files:
            h.update(rel.encode() + b"\0")
            with open(self.root / rel, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()

    def left_out_line(self, shown: int = 8) -> str:
        """One line naming what was left out and why ("" when nothing was)."""
        if not self.left_out:
            return ""
        items = [f"{rel} ({why})" for rel, why in self.left_out[:shown]]
        more = len(self.left_out) - shown
        tail = f", and {more} more (--dry-run lists them)" if more > 0 else ""
        return (f"left out of the upload, never sent: {', '.join(items)}{tail} — secrets reach a job through "
                "the cluster's environment, not its files")


def _excluded(rel: str) -> bool:
    parts = rel.split("/")
    if any(p in ALWAYS_EXCLUDED_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
        return True
    return any(fnmatch.fnmatch(parts[-1], pat) for pat in ALWAYS_EXCLUDED_FILES)


def _private_key_json(path: Path) -> bool:
    """A JSON file holding a ``private_key`` field (a cloud service-account key). Read only when small
    and when the text mentions the field; a file that mentions it but does not parse counts too."""
    try:
        if path.stat().st_size > JSON_SCAN_LIMIT:
            return False
        text = path.read_bytes()
    except OSError:
        return False
    if b'"private_key"' not in text:
        return False
    try:
        doc = json.loads(text)
    except ValueError:
        return True
    return not isinstance(doc, dict) or "private_key" in doc or "private_key_id" in doc


def secret_reason(rel: str, path: Path | None = None) -> str | None:
    """Why ``rel`` (a path inside the project) must never be uploaded, or None. ``path``, when given, is
    read to find service-account keys inside ``*.json`` files."""
    parts = rel.split("/")
    for part in parts[:-1]:
        if part in SECRET_DIRS:
            return SECRET_DIRS[part]
    name = parts[-1]
    for pattern, why in SECRET_FILES:
        if fnmatch.fnmatch(name, pattern):
            return why
    if path is not None and name.lower().endswith(".json") and _private_key_json(path):
        return SERVICE_ACCOUNT
    return None


def _git_files(root: Path) -> list[str] | None:
    """Tracked and untracked-but-not-ignored files under ``root``, or None outside a git work tree."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return [p for p in out.decode().split("\0") if p]


def _gitignore_patterns(root: Path) -> list[str]:
    path = root / ".gitignore"
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith(("#", "!"))]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """The top-level ``.gitignore``'s plain patterns (no git here): ``dir/``, ``/anchored``, globs."""
    parts = rel.split("/")
    for pat in patterns:
        dir_only, anchored = pat.endswith("/"), pat.startswith("/")
        pat = pat.strip("/")
        if anchored or "/" in pat:
            prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + (0 if dir_only else 1))]
            if any(fnmatch.fnmatch(p, pat) for p in prefixes):
                return True
        else:
            names = parts[:-1] if dir_only else parts
            if any(fnmatch.fnmatch(p, pat) for p in names):
                return True
    return False


def _walk(root: Path) -> list[str]:
    """Every path under ``root`` (outside git), links included as paths of their own: a link to a folder
    is not descended here (``_expand`` decides whether to follow it)."""
    patterns = _gitignore_patterns(root)
    out = []
    for d, dirs, names in os.walk(root):
        rel_dir = Path(d).relative_to(root).as_posix()
        links = [x for x in dirs if os.path.islink(os.path.join(d, x))]
        dirs[:] = sorted(x for x in dirs if x not in links and x not in ALWAYS_EXCLUDED_DIRS
                         and not x.endswith(".egg-info"))
        for name in names + links:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if not _ignored(rel, patterns):
                out.append(rel)
    return out


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _expand(root: Path, rel: str):
    """``(rel, None)`` for each file ``rel`` stands for, or ``(rel, why)`` for one left out. A plain file
    is itself; a link to a file inside the project is that file; a link to a folder inside the project
    is followed once: its files, under the link's path, less links found inside it."""
    path = root / rel
    if not path.is_symlink():
        if path.is_file():
            yield rel, None
        return
    target = path.resolve()
    if not _inside(target, root):
        yield rel, f"link to outside the project: {os.readlink(path)}"
        return
    if not target.exists():
        yield rel, "broken link"
        return
    if _excluded(target.relative_to(root).as_posix() + ("/x" if target.is_dir() else "")):
        yield rel, f"link to {target.relative_to(root).as_posix()}, which is never uploaded"
        return
    if target.is_file():
        yield rel, None
        return
    if _inside(path.parent.resolve(), target):
        yield rel, "link to a folder that contains it (a loop)"
        return
    for d, dirs, names in os.walk(target):  # followlinks=False: a link inside is not followed again
        dirs[:] = sorted(x for x in dirs if x not in ALWAYS_EXCLUDED_DIRS and not x.endswith(".egg-info"))
        for name in sorted(names + [x for x in dirs if os.path.islink(os.path.join(d, x))]):
            sub = f"{rel}/{(Path(d) / name).relative_to(target).as_posix()}"
            if os.path.islink(os.path.join(d, name)):
                yield sub, "link inside a linked folder (links are followed once)"
            else:
                yield sub, None


def select(root: str | Path) -> Selection:
    """The files a job from ``root`` carries: git's view of the tree (``.gitignore`` honoured; the
    top-level ``.gitignore`` outside git), less run outputs, caches, environments and model weights,
    less secrets and links that leave the project (``left_out``, with the reason)."""
    root = Path(root).resolve()
    listed = _git_files(root)
    files, left_out = [], []
    for rel in (listed if listed is not None else _walk(root)):
        for sub, why in _expand(root, rel):
            if _excluded(sub):
                continue
            why = why or secret_reason(sub, root / sub)
            if why:
                left_out.append((sub, why))
            else:
                files.append(sub)
    files = sorted(set(files))
    return Selection(root, tuple(files), tuple((root / rel).stat().st_size for rel in files),
                     tuple(sorted(set(left_out))))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_size(sel: Selection, limit: int = UPLOAD_LIMIT) -> None:
    """Refuse an upload over the Jobs limit before anything is sent, naming the largest files."""
    if not sel.files:
        raise UploadError(f"nothing to upload from {sel.root}: every file is ignored or excluded")
    if sel.total <= limit:
        return
    top = ", ".join(f"{rel} ({_mib(size)})" for rel, size in sel.largest())
    raise UploadError(f"the project upload from {sel.root} is {_mib(sel.total)}, over the Ray Jobs limit of "
                      f"{_mib(limit)}; largest files: {top} — add them to .gitignore, or put data and models "
                      "on shared storage (s3://...) and point the recipe there")


def stage(sel: Selection, dest: str | Path) -> Path:
    """Copy the selection into ``dest`` (a fresh directory): the directory Ray packs and uploads."""
    dest = Path(dest)
    for rel in sel.files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sel.root / rel, target)
    return dest
