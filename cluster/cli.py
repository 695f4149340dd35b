"""``cai submit``, ``cai jobs`` and ``cai serve``: the cluster commands."""
from __future__ import annotations

import argparse
import sys
import textwrap

from cluster import submit
from cluster.connect import RayConfig, connect
from cluster.serve.config import ServeConfig
from workflows.driver import check_model_ref

SUBMIT_EPILOG = textwrap.dedent("""\
    examples:
      ray start --head --dashboard-host 127.0.0.1          # a local cluster; or any cluster's head
      cai submit workflows/recipes/demo.yaml --run-dir /shared/runs/demo
      cai submit my_recipe.yaml --address http://HEAD:8265 --run-dir s3://bucket/runs/x --no-wait
      cai jobs logs cai-demo-1a2b3c4d5e --follow

    The project's files travel with the job (.gitignore honoured; runs/, caches, virtualenvs and
    model weights left out; over 100 MiB is refused before uploading, naming the largest files).
    Never uploaded, whatever git says: .env*, .aws/, .ssh/, .kube/, .netrc, .git-credentials,
    .pypirc, .npmrc, *.pem, *.key, *.p12, id_rsa*, id_ed25519*, JSON files with a private_key
    field, and links that point outside the project; the submission names what it left out.
    --dry-run shows the whole selection and the job without contacting a cluster.
    The same recipe, files and arguments give the same submission id: a second submit while it runs
    only reports it; after a failure it is submitted again and resumes the run directory.
    Clusters with token authentication: set RAY_AUTH_TOKEN (never put it in a file in the project).
    Exit code: 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED, 2 on a usage error.
""")


def _cmd_submit(args) -> int:
    sub = submit.plan(args.recipe, args.run_dir, args.restart_from, submit.project_root(args.project))
    if args.dry_run:
        print(submit.describe(sub, args.address))
        return 0
    job_id, new = submit.submit(sub, args.address, force=args.force)
    if args.no_wait:
        print(f"follow it: cai jobs logs {job_id} --follow   stop it: cai jobs stop {job_id}")
        return 0
    try:
        final = submit.follow(job_id, args.address)
    except KeyboardInterrupt:  # follow() said the job goes on and how to stop it
        return 130
    print(f"job {job_id}: {final}")
    return submit.exit_code(final)


def _cmd_jobs(args) -> int:
    url = submit.address(args.address)
    c = submit.client(url)
    if args.action == "list":
        jobs = submit.call(url, c.list_jobs)
        for j in sorted(jobs, key=lambda j: j.start_time or 0):
            st = getattr(j.status, "value", j.status)
            print(f"{j.submission_id or j.job_id}\t{st}\t{(j.metadata or {}).get('recipe', '')}\t{j.entrypoint}")
        return 0
    if not args.id:
        raise submit.SubmitError(f"cai jobs {args.action} needs a job id — `cai jobs list` shows them")
    if args.action == "status":
        info = submit.call(url, c.get_job_info, args.id)
        st = getattr(info.status, "value", info.status)
        print(f"{args.id}: {st}" + (f" — {info.message}" if info.message else ""))
        return submit.exit_code(st) if st in submit.TERMINAL else 0
    if args.action == "logs":
        if args.follow:
            try:
                return submit.exit_code(submit.follow(args.id, url))
            except KeyboardInterrupt:
                return 130
        sys.stdout.write(submit.call(url, c.get_job_logs, args.id))
        return 0
    stopped = submit.call(url, c.stop_job, args.id)
    print(f"{args.id}: {'stop requested' if stopped else 'already finished'}")
    return 0


SERVE_EPILOG = textwrap.dedent("""\
    examples:
      cai serve embedded                                      # the embedded model on 127.0.0.1:8000
      cai serve runs/demo/dpo/dpo_model --replicas 2 --port 8000
      CAI_API_KEY=$(openssl rand -hex 16) cai serve runs/demo/dpo/dpo_model --api-key-env CAI_API_KEY
      cai serve embedded --backend vllm --server ray-llm      # Ray's LLMServer (vLLM) behind our checks

    then, from Python:
      from openai import OpenAI
      client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")   # any key without --api-key-env
      client.chat.completions.create(model="dpo_model", messages=[{"role": "user", "content": "Hi"}])

    Concurrent requests are generated together (up to --max-batch-size). Bound to 127.0.0.1 unless
    --host says otherwise; with --host 0.0.0.0 set --api-key-env. For `serve run` / RayService use
    cluster/serve/serve_config.yaml (import_path cluster.serve.app:build).
""")


def _cmd_serve(args) -> int:
    from cluster.serve import app  # Ray Serve, FastAPI and torch: not for `cai --help`

    engine = {"backend": args.backend, "dtype": args.dtype, "max_model_len": args.max_model_len,
              "num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    cfg = ServeConfig.from_args({"model": args.model, "model_name": args.model_name, "host": args.host,
                                    "port": args.port, "replicas": args.replicas, "api_key_env": args.api_key_env,
                                    "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s,
                                    "max_body_bytes": args.max_body_bytes, "max_messages": args.max_messages,
                                    "max_prompt_chars": args.max_prompt_chars, "server": args.server, "engine": engine},
                                "cai serve")
    cfg.key_hash()  # a missing key is a usage error before anything starts
    check_model_ref(cfg.model, "cai serve MODEL")
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key_env:
        print(f"warning: serving on {cfg.host} without --api-key-env: anyone who can reach this port can use it",
              file=sys.stderr)
    connect(RayConfig(address=args.address))
    app.wait_until_interrupted(app.start(cfg), cfg.served_name)
    return 0


def register(sub) -> None:
    s = sub.add_parser("submit", help="run a recipe on a Ray cluster (Ray Jobs API)", epilog=SUBMIT_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Upload the project and run `cai run RECIPE` as a Ray job on a cluster.")
    s.add_argument("recipe", help="recipe YAML inside the project, e.g. workflows/recipes/demo.yaml")
    s.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: RAY_ADDRESS, "
                                     "else http://127.0.0.1:8265)")
    s.add_argument("--run-dir", help="where the job writes the run: s3://bucket/prefix or a path every node "
                                     "shares (default: the recipe's run_dir, relative to the job's directory)")
    s.add_argument("--restart-from", metavar="STAGE", help="redo this stage and every stage after it")
    s.add_argument("--project", metavar="DIR", help="the directory uploaded as the job's working_dir "
                                                    "(default: this cai-ray checkout, else the current directory)")
    s.add_argument("--force", action="store_true", help="submit again even if this exact job already succeeded")
    s.add_argument("--dry-run", action="store_true", help="print the files that would be uploaded (sizes, total, "
                                                          "what is left out and why) and the job, contact nothing")
    wait = s.add_mutually_exclusive_group()
    wait.add_argument("--follow", action="store_true", help="stream the job's logs until it ends (the default)")
    wait.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    s.set_defaults(fn=_cmd_submit)

    j = sub.add_parser("jobs", help="list, inspect, follow or stop submitted jobs",
                       description="Jobs on a Ray cluster: list | status ID | logs ID [--follow] | stop ID.")
    j.add_argument("action", choices=["list", "status", "logs", "stop"])
    j.add_argument("id", nargs="?", help="the submission id `cai submit` printed")
    j.add_argument("--address", help="the cluster's dashboard (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    j.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    j.set_defaults(fn=_cmd_jobs)

    v = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible API (Ray Serve)",
                       epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Start Ray Serve with an OpenAI-compatible chat API over one of our engines.")
    v.add_argument("model", help="embedded, a Hugging Face model directory (e.g. runs/demo/dpo/dpo_model) or a .gguf")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--replicas", type=int, default=1, help="model copies, each a Ray actor (default 1)")
    v.add_argument("--api-key-env", metavar="VAR", help="require `Authorization: Bearer $VAR` (the variable's "
                                                        "name; the key stays in the environment)")
    v.add_argument("--model-name", help="the model id clients send (default: the model directory's name)")
    v.add_argument("--max-batch-size", type=int, default=8, help="concurrent requests generated together")
    v.add_argument("--batch-wait-s", type=float, default=0.1, help="how long a batch waits to fill (default 0.1)")
    v.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted, in bytes (default 1048576: 1 MiB); larger is a 413")
    v.add_argument("--max-messages", type=int, default=256, help="most messages in one request (default 256)")
    v.add_argument("--max-prompt-chars", type=int, default=None,
                   help="most characters in one request's messages, checked before tokenizing "
                        "(default: 32 per token of --max-model-len)")
    v.add_argument("--backend", default="auto", choices=["auto", "transformers", "vllm"],
                   help="auto (default): vLLM on a CUDA GPU where it is installed, else transformers")
    v.add_argument("--server", default="auto", choices=["auto", "cai", "ray-llm"],
                   help="with --backend vllm: cai (our batching app) or ray-llm (Ray's LLMServer, vLLM's "
                        "continuous batching, behind the same key and limits); auto: the measured pick")
    v.add_argument("--dtype", default="auto", help="auto (bf16 on GPU and on CPUs with native bf16), float32, ...")
    v.add_argument("--max-model-len", type=int, default=2048, help="prompt + completion tokens")
    v.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    v.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    v.add_argument("--address", default="local", help="Ray cluster: local (start one here), auto, ray://HOST:10001")
    v.set_defaults(fn=_cmd_serve)
