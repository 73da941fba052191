"""``edgeloop pipeline run|ls|show``: the closed retraining loop (cloud/loop/closed_loop.py, docs/pipeline.md).

``pipeline run FILE`` runs collect -> train -> evaluate -> package, then, when the file has a
``[rollout]`` section, creates the rollout and watches it while the running ``edgeloop serve``
drives it, and promotes or archives the candidate. Steps whose inputs did not change are
skipped. ``--on-drift`` runs only if a drift alert was stored since this pipeline last ran.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgeloop.cloud.errors import UserError
from edgeloop.cloud.workspace import Workspace
from edgeloop.fleet._output import Output

if TYPE_CHECKING:
    from edgeloop.cloud.registry import Registry

__all__ = ["add_pipeline_commands"]


def add_pipeline_commands(sub: Any, group: Callable, action: Callable) -> None:
    pipes = group(sub, "pipeline", "the closed loop: collect device data, retrain, gate, package, canary, promote", _ls)
    p = action(pipes, "run", "run a pipeline file; unchanged steps are reused, not redone", _run)
    p.add_argument("file", metavar="FILE|NAME",
                   help="a pipeline file (TOML), or the name of a shipped one (digits-retrain: "
                        "cloud/loop/pipelines/digits-retrain.toml)")
    p.add_argument("--on-drift", action="store_true",
                   help="run only if a drift alert was stored since this pipeline's last run")
    p.add_argument("--no-rollout", action="store_true", help="stop after packaging, even if the file has [rollout]")
    p.add_argument("--repository-url", help="where devices download from (default: the running edgeloop serve's)")
    action(pipes, "ls", "list pipeline runs", _ls)
    p = action(pipes, "show", "show one pipeline run, step by step", _show)
    p.add_argument("run_id", metavar="RUN")


def shipped_pipelines() -> dict[str, Path]:
    """The pipeline files shipped with edgeloop, by name (their file stem)."""
    import edgeloop.cloud.loop as loop   # a docstring-only package: nothing heavy

    return {f.stem: f for f in sorted((Path(loop.__file__).parent / "pipelines").glob("*.toml"))}


def pipeline_file(text: str) -> Path:
    """``text`` as a pipeline file: a path that exists, else a shipped pipeline's name.
    Raises UserError naming both ways when it is neither."""
    path = Path(text)
    if path.exists() or path.suffix == ".toml" or "/" in text:
        return path              # load_pipeline says what is wrong with a path that does not read
    shipped = shipped_pipelines()
    if text in shipped:
        return shipped[text]
    raise UserError(f"no pipeline file {text!r}, and no shipped pipeline of that name "
                    f"(shipped: {', '.join(shipped) or 'none'}); give a .toml path or one of those names")


def _registry(args: argparse.Namespace) -> tuple[Workspace, Registry]:
    from edgeloop.cloud.registry import Registry

    ws = Workspace.open(args.workspace)
    return ws, Registry(ws.store_location)


def _run(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.loop.closed_loop import controller_driver, load_pipeline, pipeline_runs, run_pipeline
    from edgeloop.fleet.cli_rollout import _controller, _serve_url

    pipe = load_pipeline(pipeline_file(args.file))
    ws, registry = _registry(args)
    trigger = "manual"
    if args.on_drift:
        last = max((r["started_at"] for r in pipeline_runs(registry) if r["name"] == pipe.name), default=0.0)
        alerts = [a for a in registry.alerts() if a["created_at"] > last and a["kind"] in ("drift", "skew")]
        if not alerts:
            out.result({"ran": False, "reason": "no drift alert since the last run"},
                       f"no drift alert since {pipe.name} last ran; nothing to do")
            return 0
        trigger = f"drift: {len(alerts)} alert(s), e.g. {alerts[-1]['cohort']} {alerts[-1]['key']}"
    deploy = watch = None
    if pipe.rollout is not None and not args.no_rollout:
        url = args.repository_url or _serve_url(args)   # fails before anything runs if nobody serves
        deploy, watch = controller_driver(_controller(args, url), drive=False)
    run = run_pipeline(ws, registry, pipe, deploy, watch, progress=lambda step, msg: out.info(f"{step}: {msg}"),
                       trigger=trigger)
    obj = run.to_obj()
    lines = [f"pipeline {pipe.name} run {run.run_id}: {run.status}" + (f" ({run.reason})" if run.reason else "")]
    lines += [f"  {s.step:<9} {'cached' if s.cached else 'ran':<6} {s.seconds:6.1f} s" for s in run.steps]
    out.result(obj, "\n".join(lines))
    return 0 if run.status == "succeeded" else 1


def _ls(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.loop.closed_loop import pipeline_runs

    _, registry = _registry(args)
    rows = pipeline_runs(registry)
    out.table("pipeline runs", ["run", "pipeline", "status", "trigger", "steps (cached)", "reason"],
              [[r["run_id"], r["name"], r["status"], r["trigger"],
                f"{len(r['steps'])} ({sum(1 for s in r['steps'] if s['cached'])})", r["reason"]] for r in rows],
              rows)
    return 0


def _show(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.loop.closed_loop import pipeline_runs

    _, registry = _registry(args)
    rows = [r for r in pipeline_runs(registry) if r["run_id"] == args.run_id]
    if not rows:
        raise UserError(f"no pipeline run {args.run_id!r} (see: edgeloop pipeline ls)")
    run = rows[0]
    out.table(f"pipeline run {run['run_id']} ({run['name']}): {run['status']}",
              ["step", "cached", "seconds", "output"],
              [[s["step"], "yes" if s["cached"] else "no", s["seconds"],
                ", ".join(f"{k}={v}" for k, v in s["output"].items() if not isinstance(v, dict))[:100]]
               for s in run["steps"]], run)
    return 0
