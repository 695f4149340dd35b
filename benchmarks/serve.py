"""Requests/s and p50/p95 latency of ``cai serve`` (Ray Serve, batched) versus a naive server that
answers one request at a time with ``model.generate``, both with the embedded SmolLM2-135M-Instruct,
measured in one run with the official ``openai`` client at concurrency 1, 4 and 16.

    python benchmarks/serve.py [--requests 32] [--max-tokens 48] [--dtype auto] [--backends transformers,vllm]

Both servers get the same model, number format, threads (every core), prompts and greedy decoding;
they run one after the other, never side by side. Goal: at least 3x the naive throughput at
concurrency 16. The first line names the processor and the number format chosen there.
``--backends``: ``cai serve`` once per engine backend, one after the other; the last line also gives
vLLM's requests/s at the top concurrency against transformers'. ``ray-llm`` among them is
``cai serve --backend vllm --server ray-llm``: Ray's ``LLMServer`` (vLLM's async engine, continuous
batching) behind our gateway (key, limits, request ids); ``ray-llm-bare`` serves the same model with
Ray's own OpenAI app and no checks of ours, to show what the gateway costs. Both with the settings our
CPU vLLM engine uses (eager, 1 GiB KV cache, the same dtype).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = ["Give me three tips for a job interview.", "How do I boil an egg?", "What is a prime number?",
           "Name two uses of vinegar at home.", "Explain what a budget is.", "How can I sleep better?",
           "What does a compass do?", "Suggest a name for a cat."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def naive_server(args, port: int):
    """One request at a time: a lock around ``model.generate`` on one conversation."""
    import torch

    from actors.models import chat_prompt_ids, choose, load_causal_lm, load_tokenizer, resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    source = resolve_model("embedded")
    model = load_causal_lm(source, choose(args.dtype, torch.device("cpu")).dtype, "cpu").eval()
    tok = load_tokenizer(source)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            ids = torch.tensor([chat_prompt_ids(tok, body["messages"])])
            with lock, torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=body["max_tokens"],
                                     do_sample=False, pad_token_id=tok.pad_token_id)
            new = out[0, ids.shape[1]:].tolist()
            text = tok.decode(new, skip_special_tokens=True).strip()
            data = json.dumps({"id": "naive", "object": "chat.completion", "created": int(time.time()),
                               "model": "embedded", "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": text}}],
                               "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(new),
                                         "total_tokens": ids.shape[1] + len(new)}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def ray_llm_app(args, max_batch: int) -> str:
    """The embedded model behind ``ray.serve.llm``'s OpenAI app (one replica); its base URL."""
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    from actors.models import choose, prepare_model

    cfg = LLMConfig(model_loading_config={"model_id": "embedded", "model_source": prepare_model("embedded").path},
                    accelerator_config={"kind": "cpu"},
                    deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
                    engine_kwargs={"dtype": choose(args.dtype, "cpu").name, "max_model_len": 1024, "enforce_eager": True,
                                   "kv_cache_memory_bytes": 1 << 30, "max_num_seqs": max_batch})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_openai_app({"llm_configs": [cfg]}), blocking=False, name="ray-llm")
    url = f"http://127.0.0.1:{port}/v1"
    import openai

    client, t = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=30), time.time()
    while True:  # the app answers once its engine has loaded
        try:
            client.models.list()
            return url
        except Exception:  # noqa: BLE001
            if time.time() - t > 600:
                raise
            time.sleep(2)


def load(url: str, concurrency: int, n: int, max_tokens: int) -> dict:
    """``n`` requests from ``concurrency`` client threads: requests/s, tokens/s, p50/p95 latency."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)

    def one(i):
        t = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model=client_model[url], max_tokens=max_tokens, temperature=0,
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        r = raw.parse()
        batches.append(int(raw.headers.get("x-cai-batch-size", 1)))
        return time.perf_counter() - t, r.usage.completion_tokens

    batches: list[int] = []

    one(0)  # warm-up, not counted
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    lat = sorted(x for x, _ in results)
    return {"rps": round(n / wall, 3), "tok_s": round(sum(t for _, t in results) / wall, 1),
            "p50": round(statistics.median(lat), 2), "p95": round(lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))], 2),
            "mean_batch": round(statistics.mean(batches[1:]), 1)}


client_model: dict[str, str] = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--batch-wait", type=float, default=0.1, help="seconds a batch waits to fill (cai serve's default)")
    ap.add_argument("--backends", default="transformers", help="cai serve's engine backends, comma-separated")
    args = ap.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    levels = [int(x) for x in args.levels.split(",")]

    from benchmarks.common import formats_line, number_formats
    print(formats_line(number_formats(args.dtype)), flush=True)

    names = {"ray-llm": "cai serve (vllm, ray-llm)", "ray-llm-bare": "ray.serve.llm (bare)"}
    servers = [names.get(b, f"cai serve ({b})") for b in backends]
    results: dict[str, dict[int, dict]] = {"naive": {}, **{name: {} for name in servers}}
    port = free_port()
    naive = naive_server(args, port)
    url = f"http://127.0.0.1:{port}/v1"
    client_model[url] = "embedded"
    for c in levels:
        results["naive"][c] = load(url, c, args.requests, args.max_tokens)
        print(f"naive     c={c:<3} {results['naive'][c]}", flush=True)
    naive.shutdown()
    import gc
    gc.collect()

    from ray import serve

    from cluster.connect import RayConfig, connect
    from cluster.serve.app import start
    from cluster.serve.config import ServeConfig

    # ray-llm's OpenAI ingress takes a CPU of its own beside the engine's: logical CPUs for both
    connect(RayConfig(num_cpus=os.cpu_count() + 2, progress_bars=False))
    for backend, name in zip(backends, servers):
        if backend == "ray-llm-bare":
            url = ray_llm_app(args, max(levels))
            client_model[url] = "embedded"
        else:
            ray_llm = backend == "ray-llm"
            cfg = ServeConfig.from_args({"model": "embedded", "port": free_port(), "max_batch_size": max(levels),
                                         "batch_wait_timeout_s": args.batch_wait,
                                         "server": "ray-llm" if ray_llm else "cai",
                                         "engine": {"backend": "vllm" if ray_llm else backend, "dtype": args.dtype,
                                                    "num_cpus": os.cpu_count(), "max_model_len": 1024}})
            url = start(cfg)
            client_model[url] = cfg.served_name
        try:
            for c in levels:
                results[name][c] = load(url, c, args.requests, args.max_tokens)
                print(f"{name} c={c:<3} {results[name][c]}", flush=True)
        finally:
            serve.shutdown()

    print("\nconcurrency | naive req/s | " + " | ".join(f"{n} req/s | ratio" for n in servers)
          + " | naive p50/p95 s | " + " | ".join(f"{n} p50/p95 s" for n in servers))
    for c in levels:
        n = results["naive"][c]
        cells = " | ".join(f"{results[s][c]['rps']:.2f} | {results[s][c]['rps'] / n['rps']:.2f}" for s in servers)
        lat = " | ".join(f"{results[s][c]['p50']:.2f}/{results[s][c]['p95']:.2f}" for s in servers)
        print(f"{c:>11} | {n['rps']:>11.2f} | {cells} | {n['p50']:.2f}/{n['p95']:.2f} | {lat}")
    top = max(levels)
    ratio = results[servers[0]][top]["rps"] / results["naive"][top]["rps"]
    line = (f"{servers[0]} at concurrency {top}: {ratio:.2f}x the naive server's requests/s "
            f"({'meets' if ratio >= 3 else 'misses'} the 3x goal)")
    if {"transformers", "vllm"} <= set(backends):
        v, t = (results[f"cai serve ({b})"][top]["rps"] for b in ("vllm", "transformers"))
        line += f"; vllm {v:.2f} vs transformers {t:.2f} req/s at concurrency {top} = {v / t:.2f}x"
    for other in ("ray-llm", "ray-llm-bare"):
        if {"vllm", other} <= set(backends):
            v, r = results["cai serve (vllm)"][top]["rps"], results[names[other]][top]["rps"]
            line += f"; {names[other]} {r:.2f} vs cai serve (vllm) {v:.2f} req/s = {r / v:.2f}x"
    print(line)


if __name__ == "__main__":
    main()
