"""What a submitted job carries: the project's files, as git sees them, without run outputs, caches,
virtualenvs or model weights; measured before anything is uploaded, and staged in a directory of
their own so the upload is exactly the measured selection.

Pure file logic (no Ray): ``select`` → ``check_size`` → ``stage``.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from workflows.core.errors import CaiError

UPLOAD_LIMIT = 100 * 1024 * 1024  # the Ray Jobs API refuses larger working_dir packages
# Never uploaded, even when git tracks them: run outputs, caches, environments, model weights.
ALWAYS_EXCLUDED_DIRS = ("runs", ".git", "__pycache__", ".venv", "venv", "env", ".pytest_cache", ".ruff_cache",
                        ".mypy_cache", ".ipynb_checkpoints", "build", "dist", "wandb", ".cache")
ALWAYS_EXCLUDED_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth", "*.ckpt", "*.onnx", "*.pyc",
                         "*.egg-info", ".DS_Store")


class UploadError(CaiError):
    """The project cannot be uploaded as it is (too large, nothing to send)."""


@dataclass(frozen=True)
class Selection:
    root: Path
    files: tuple[str, ...]  # paths relative to root, '/'-separated, sorted
    sizes: tuple[int, ...]

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


def _excluded(rel: str) -> bool:
    parts = rel.split("/")
    if any(p in ALWAYS_EXCLUDED_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
        return True
    return any(fnmatch.fnmatch(parts[-1], pat) for pat in ALWAYS_EXCLUDED_FILES)


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
    patterns = _gitignore_patterns(root)
    out = []
    for d, dirs, names in os.walk(root):
        rel_dir = Path(d).relative_to(root).as_posix()
        dirs[:] = sorted(x for x in dirs if x not in ALWAYS_EXCLUDED_DIRS and not x.endswith(".egg-info"))
        for name in names:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if not _ignored(rel, patterns):
                out.append(rel)
    return out


def select(root: str | Path) -> Selection:
    """The files a job from ``root`` carries: git's view of the tree (``.gitignore`` honoured; the
    top-level ``.gitignore`` outside git), less run outputs, caches, environments and model weights."""
    root = Path(root).resolve()
    listed = _git_files(root)
    files = sorted(rel for rel in (listed if listed is not None else _walk(root))
                   if not _excluded(rel) and (root / rel).is_file())
    return Selection(root, tuple(files), tuple((root / rel).stat().st_size for rel in files))


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
