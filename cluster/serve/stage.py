"""The ``serve`` stage: a recipe ends by serving its final policy (``model: sft_model``, ``dpo_model``,
``ppo_model`` or a path) behind the OpenAI-compatible API. It is never "finished": every run serves.

``wait: true`` (default) keeps the run serving until Ctrl-C — on a local cluster the server lives only
as long as the run. ``wait: false`` deploys and lets the run end, for a long-lived cluster (a submitted
job, a RayCluster), where the application stays up until ``serve shutdown``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

from cluster.serve import app
from cluster.serve.config import ServeConfig
from workflows.core import summary
from workflows.core.stage import StageContext


@dataclass
class ServeStageConfig(ServeConfig):
    model: str = "sft_model"  # an earlier stage's model, or a path / `embedded`
    wait: bool = True


def run(cfg: ServeStageConfig, ctx: StageContext) -> dict:
    started = time.time()
    model = ctx.resolve(cfg.model)
    served = replace(cfg, model=model, model_name=cfg.model_name or cfg.model)
    url = app.start(served)
    info = {"stage": ctx.name, "inputs": 0, "outputs": 0, "errors": 0, "seconds": time.time() - started,
            "headline": f"served {served.served_name!r} ({model}) at {url}", "url": url}
    summary.write_stage_summary(ctx, info)
    if cfg.wait:
        app.wait_until_interrupted(url, served.served_name)
    else:
        print(f"[{ctx.name}] serving {served.served_name!r} at {url}; it stays up on a long-lived cluster "
              "(on a local one it stops with this run)")
    return info
