"""The ``edgeloop`` command line.

Every command takes ``--json`` (one JSON object as the last line of output) and
``--workspace`` (default ``$EDGELOOP_WORKSPACE`` or ``./edgeloop-workspace``). A user
mistake is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from edgeloop.cloud.errors import CloudError, ServiceUnavailable, UserError
from edgeloop.cloud.workspace import DEFAULT_MQTT, Workspace
from edgeloop.fleet import remote
from edgeloop.fleet._args import duration as _duration, positive_int as _positive
from edgeloop.fleet._output import Output, error_object
from edgeloop.fleet._parser import Parser as _Parser, UsageError, VersionAction
from edgeloop.fleet._parser import action as _action, common as _common, group as _group
from edgeloop.fleet._serve_lock import SERVE_FILE
from edgeloop.fleet._workspace import open_registry as _registry, open_workspace as _open
from edgeloop.fleet.remote import remote_ok

EXIT_INTERNAL = 70

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgeloop", description="Train, package, sign and ship ML models to device fleets "
                     "over MQTT, and watch them in the field.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def cmd(name: str, help_: str, fn: Callable[[argparse.Namespace, Output], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p)
        p.set_defaults(fn=fn)
        return p

    p = cmd("init", "create a workspace (registry, signing keys, update repository)", _init)
    p.add_argument("--http", metavar="HOST:PORT", default="127.0.0.1:0",
                   help="where `edgeloop serve` serves the update repository (port 0: any free port)")
    p.add_argument("--fleet", metavar="FLEET_ID",
                   help="the fleet id, the namespace of its MQTT topics: 1-32 of [a-z0-9-] "
                        "(default: fleet- and 12 random hex digits)")
    p.add_argument("--recreate-registry", action="store_true",
                   help="start an empty registry.db in an existing workspace whose registry is missing, keeping "
                        "its keys and signed repositories (what the registry recorded is lost; restoring "
                        "registry.db from a backup is better)")
    p.add_argument("--join", metavar="WORKSPACE", type=Path,
                   help="make -w the folder of another host serving WORKSPACE's fleet: same store (PostgreSQL), "
                        "keys and signed repositories, its own serve (docs/multihost.md)")
    p.add_argument("--host", metavar="NAME", help="with --join: this host's name (its MQTT sessions; default: the "
                                                  "folder's name)")

    p = cmd("train", "train a model (one process, or distributed with torchrun) and register a model version", _train)
    p.add_argument("--data", metavar="NAME[:V]|PATH",
                   help="registered data set, or a CSV file/folder (registered on the way); default: shipped digits")
    p.add_argument("--model", default="digits-mlp", help="model name (default: digits-mlp)")
    p.add_argument("--model-def", metavar="FILE.py:FUNCTION",
                   help="your own PyTorch model: FUNCTION(input_shape, n_outputs) returns an nn.Module "
                        "(docs/models.md); default: the built-in MLP")
    p.add_argument("--task", choices=["classification", "regression", "anomaly"],
                   help="what the model predicts; default: what the data set declares (classification for CSV)")
    p.add_argument("--layers", type=_positive, default=2, help="hidden layers of the built-in MLP")
    p.add_argument("--epochs", type=_positive, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=_positive, default=32, help="hidden layer width")
    p.add_argument("--batch-size", type=_positive, default=64, help="global batch size")
    p.add_argument("--lr", type=float, default=0.01)
    _dist_args(p)

    p = cmd("reproduce", "re-run a recorded training run and verify its weights are bit-identical", _reproduce)
    p.add_argument("run_id", metavar="RUN", help="a run id, or latest")
    p.add_argument("--nproc-per-node", type=_positive, help="default: the recorded world size")

    runs = _group(sub, "runs", "list training runs, or show one's full record", _runs_ls)
    _action(runs, "ls", "list runs", _runs_ls)
    _action(runs, "show", "show a run record", _runs_show).add_argument("run_id", metavar="RUN",
                                                                    help="a run id, or latest")

    data = _group(sub, "data", "register and list data sets", _data_ls)
    p = _action(data, "add", "register a data set version (CSV file or folder, .npz, image folder)", _data_add)
    p.add_argument("name", metavar="NAME")
    p.add_argument("path", metavar="PATH", type=Path)
    p.add_argument("--task", choices=["classification", "regression", "anomaly"],
                   help="how the labels read (default: what an .npz declares, else classification)")
    _action(data, "ls", "list data sets", _data_ls)
    p = _action(data, "example", "write a shipped example data set as .npz (no download)", _data_example)
    p.add_argument("example", metavar="NAME", choices=_example_data_names(),
                   help=", ".join(_example_data_names()))
    p.add_argument("--dest", type=Path, default=Path("."), metavar="DIR", help="folder to write into (default: .)")

    p = cmd("lineage", "what a device runs and where it came from, down to the data hash", _lineage)
    p.add_argument("device_id", metavar="DEVICE")

    p = cmd("package", "build a model version's package for a hardware tier, proven on its runtime", _package)
    p.add_argument("model_version", metavar="MODEL_VERSION", help="for example digits-mlp:1")
    p.add_argument("--tier", default="edge-gateway",
                   help="gpu-server, edge-gateway, mobile, mcu (or a workspace tier), or all (default: edge-gateway)")
    p.add_argument("--report", action="store_true", help="print each tier's accuracy, size and latency against fp32")
    p.add_argument("--export-triton", metavar="DIR", type=Path,
                   help="also write the gpu-server package as a Triton model repository in DIR")
    p.add_argument("--export-c", metavar="DIR", type=Path,
                   help="with --tier mcu: write the package's AOT C library (model.c, model.h, kernels) into DIR")

    p = cmd("publish", "sign a package into the update repository and announce it to the fleet", _publish)
    p.add_argument("model_version", metavar="MODEL_VERSION")
    p.add_argument("--tier", default="edge-gateway")
    p.add_argument("--repository-url", help="URL devices download from (default: the running `edgeloop serve`)")

    p = cmd("serve", "run the control plane: serve the update repository, ingest telemetry", _serve)
    p.add_argument("--duration", type=_duration, help="stop after this long: 30s, 5m, 1h, 2d or seconds "
                   "(default: until Ctrl-C)")
    p.add_argument("--api", metavar="HOST:PORT", default="127.0.0.1:0",
                   help="where to serve the authenticated HTTP API (default 127.0.0.1, any free port)")
    p.add_argument("--worker", metavar="NAME",
                   help="this process's broker identity and session, when several serve one fleet (default: the "
                        "workspace's host name, else serve)")
    p.add_argument("--ingest", choices=["shared", "exclusive"], default="shared",
                   help="shared: several workers split the stream (MQTT 5 shared subscription); exclusive: this "
                        "one worker takes it all, and loses nothing across a broker restart even if devices "
                        "return first (docs/contracts/telemetry.md)")
    p.add_argument("--ingest-workers", type=_positive, default=1, metavar="N",
                   help="control-plane connections in this process splitting the stream (shared ingest only)")

    from edgeloop.fleet.cli_devices import add_broker_commands, add_devices_commands
    add_devices_commands(sub)
    add_broker_commands(sub)

    models = _group(sub, "models", "list, show, promote and archive model versions", _models)
    _action(models, "ls", "list model versions", _models)
    _action(models, "show", "show a model version", _models_show).add_argument("model_version", metavar="MODEL_VERSION")
    p = _action(models, "promote", "move a model version to staging or production (gated)", _models_promote)
    p.add_argument("model_version", metavar="MODEL_VERSION")
    p.add_argument("--to", dest="stage", choices=["staging", "production"], default="production")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="accuracy the candidate may lose against production (default 0.01)")
    _action(models, "archive", "archive a model version", _models_archive).add_argument(
        "model_version", metavar="MODEL_VERSION")
    from edgeloop.fleet.cli_models_import import add_models_import
    add_models_import(models, _action)
    drift = _group(sub, "drift", "drift and skew against the training baseline, per cohort", _drift_report)
    p = _action(drift, "report", "compare device telemetry with each model version's training baseline",
                _drift_report)
    p.add_argument("--cohort", choices=["device", "tier", "tag", "site", "model_version", "fleet"], default="device")
    from edgeloop.fleet.cli_labels import add_labels_commands
    add_labels_commands(sub, _group, _action)
    from edgeloop.fleet.cli_keys import add_keys_commands
    add_keys_commands(sub, _group, _action)
    from edgeloop.fleet.cli_tokens import add_tokens_commands
    add_tokens_commands(sub, _group, _action)
    from edgeloop.fleet.cli_audit import add_audit_command
    add_audit_command(sub, _common)
    from edgeloop.fleet.cli_rollout import add_rollout_commands
    add_rollout_commands(sub, _group, _action)
    from edgeloop.fleet.cli_pipeline import add_pipeline_commands
    add_pipeline_commands(sub, _group, _action)
    cmd("status", "summarize the fleet: models, updates, device states, telemetry", _status)
    from edgeloop.fleet.cli_swarm import add_swarm_command
    add_swarm_command(sub, _common)
    from edgeloop.fleet.completion import add_completion_command
    add_completion_command(sub)

    from edgeloop.fleet.cli_swarm import sample_rate as _rate
    p = cmd("simulate", "run a simulated fleet against the broker that waits for updates until --duration or "
                        f"Ctrl-C: full agents (thread each) up to {FULL_AGENTS_MAX} devices, the asyncio swarm "
                        "beyond (see: edgeloop swarm --help)", _simulate)
    p.add_argument("--devices", type=_positive, default=20)
    p.add_argument("--engine", choices=["auto", "agents", "swarm"], default="auto",
                   help=f"agents: full device agents; swarm: thousands on one event loop; auto: agents up to "
                        f"{FULL_AGENTS_MAX} devices")
    p.add_argument("--tier", default="edge-gateway")
    p.add_argument("--samples", type=_positive, default=60,
                   help="requests each device serves on each model version it installs (default 60)")
    p.add_argument("--sample-rate", type=_rate, default=0.0, metavar="R",
                   help="share (0..1) of served requests each device sends, labelled, in its telemetry: the "
                        "device data `edgeloop pipeline run` retrains on (default 0: none)")
    p.add_argument("--duration", type=_duration, metavar="DURATION",
                   help="stop after this long: 30s, 5m, 1h, 2d or seconds (default: run until Ctrl-C or SIGTERM)")
    p.add_argument("--prefix", default="sim", help="device id prefix (ids: PREFIX-TIER-00000)")

    p = cmd("demo", "run the whole loop once: train, package, sign, announce, install, report", _demo)
    p.add_argument("--devices", type=_positive, help="simulated devices (default 20; 10 with --loop)")
    p.add_argument("--samples", type=_positive, default=60, help="requests each device serves")
    p.add_argument("--epochs", type=_positive, default=30)
    p.add_argument("--timeout", type=_duration, default=180.0, help="how long to wait for the fleet: 30s, 5m "
                   "or seconds (default 180)")
    p.add_argument("--prefix", default="demo", help="device id prefix (default: demo)")
    p.add_argument("--loop", action="store_true",
                   help="the closed loop: deploy v1, inject sensor drift, detect it, retrain on device data, "
                        "canary and promote v2, and print fleet accuracy before drift, after drift, after v2")
    p.add_argument("--example", metavar="NAME", choices=_example_names(),
                   help="run a shipped example (your-own-model path) instead of the digits MLP: "
                        + ", ".join(_example_names()))
    return parser


def _example_names() -> list[str]:
    from edgeloop.cloud.examples import EXAMPLES   # no heavy imports: a dict of names
    return sorted(EXAMPLES)


def _dist_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed training (torchrun semantics)")
    g.add_argument("--nproc-per-node", type=_positive, default=1, help="worker processes on this machine")
    g.add_argument("--nnodes", default="1", help="machines in the job: N or MIN:MAX")
    g.add_argument("--node-rank", type=int, default=0, help="this machine's rank")
    g.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous address for several machines")
    g.add_argument("--max-restarts", type=int, default=0, help="restarts after a worker failure")
    g.add_argument("--checkpoint-every", type=int, default=50, help="checkpoint every N steps (0: never)")


def _dist_config(args: argparse.Namespace):  # noqa: ANN202
    from edgeloop.cloud.train.launcher import DistConfig
    if args.nnodes != "1" and not args.rdzv_endpoint:
        raise UserError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT")
    return DistConfig(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
                      rdzv_endpoint=args.rdzv_endpoint, max_restarts=args.max_restarts)


# -- commands ----------------------------------------------------------------------------------
def _init(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.registry import Registry

    existed = (args.workspace / "edgeloop.toml").exists()
    if args.host and not args.join:
        raise UserError("--host names a host made with --join WORKSPACE")
    if args.join:
        if args.recreate_registry or args.fleet:
            raise UserError("--join takes the fleet and store of the workspace it joins (drop --fleet and "
                            "--recreate-registry)")
        from edgeloop.fleet.broker import share_group

        shared = Workspace.open(args.join)
        ws = shared.add_host(args.workspace, args.host or args.workspace.resolve().name.lower(), args.http)
        share_group(ws)          # the fleet's share group, made now if it is not yet: one for every host
        out.result({"workspace": str(ws.root), "created": True, "host": ws.host, "joined": str(shared.root),
                    "fleet": ws.fleet}, f"created host {ws.host} of {shared.root} in {ws.root} (fleet {ws.fleet}; "
                                        f"run edgeloop serve -w {ws.root} there)")
        return 0
    if args.recreate_registry:           # the one way to an empty registry beside existing data
        ws = Workspace.open(args.workspace, check=False)
        if ws.registry_path.exists() and ws.registry_path.stat().st_size > 0:
            raise UserError(f"{ws.registry_path} exists: --recreate-registry only replaces a missing one "
                            "(a damaged one: move it aside first)")
        ws.check(registry=False)         # missing keys or trusted roots: still refused, nothing created
    else:
        ws = Workspace.init(args.workspace, mqtt=args.mqtt or DEFAULT_MQTT, http=args.http, fleet=args.fleet)
    Registry(ws.store_location).close()
    ws.image_repository().init()
    ws.director_repository().init()
    out.result({"workspace": str(ws.root), "created": not existed, "mqtt": f"{ws.mqtt_host}:{ws.mqtt_port}",
                "fleet": ws.fleet, **({"registry_recreated": True} if args.recreate_registry else {})},
               f"{'created an empty registry in' if args.recreate_registry else 'using existing' if existed else 'created'}"
               f" workspace {ws.root} "
               f"(broker {ws.mqtt_host}:{ws.mqtt_port}, fleet {ws.fleet})")
    return 0


def _train(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.loop.pipeline import train_model
    from edgeloop.cloud.train.training import TrainParams

    ws = _open(args)
    registry = _registry(ws)
    params = TrainParams(seed=args.seed, epochs=args.epochs, hidden=args.hidden, layers=args.layers,
                         batch_size=args.batch_size, lr=args.lr, checkpoint_every=args.checkpoint_every)
    previous = signal.signal(signal.SIGTERM, _interrupt)   # SIGTERM ends the run interrupted, as Ctrl-C does
    try:
        with out.progress() as progress:
            result = train_model(ws, registry, params, args.data, args.model, _dist_config(args),
                                 on_epoch=lambda e, row: progress("train", e, args.epochs),
                                 model_def=args.model_def, task=args.task)
    finally:
        signal.signal(signal.SIGTERM, previous)
    out.result(result, f"registered {result['model_version']} (run {result['run_id']}, data {result['dataset_id']}, "
                       f"{result['world_size']} process(es), {result['task']['kind']}): "
                       f"{quality_line(result['metrics'])}")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    from edgeloop.cloud.errors import Interrupted
    raise Interrupted(signal.Signals(signum).name)


def quality_line(m: dict) -> str:
    """The task's figures of a run, validation then test: accuracy, MAE or anomaly rate."""
    parts = []
    for split, name in (("val", "validation"), ("test", "test")):
        if f"{split}_mae" in m:
            parts.append(f"{name} MAE {m[f'{split}_mae']:.3f} ({m[f'{split}_within_tolerance']:.1%} within tolerance)")
        elif f"{split}_anomaly_rate" in m:
            parts.append(f"{name} accuracy {m[f'{split}_accuracy']:.3f}, anomaly rate {m[f'{split}_anomaly_rate']:.3f}")
        else:
            parts.append(f"{name} accuracy {m[f'{split}_accuracy']:.3f}")
    return ", ".join(parts)


def _reproduce(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.train.launcher import DistConfig
    from edgeloop.cloud.loop.pipeline import reproduce_run

    ws = _open(args)
    dist = DistConfig(nproc_per_node=args.nproc_per_node) if args.nproc_per_node else None
    registry = _registry(ws)
    args.run_id = _run_ref(registry, args.run_id)
    with out.progress() as progress:
        r = reproduce_run(ws, registry, args.run_id, dist, on_epoch=lambda e, row: progress("train", e, 0))
    if r["identical"]:
        verdict = f"identical: weights sha256 {r['weights_sha256'][:16]} match run {args.run_id}"
    elif r["bit_identity_expected"]:
        verdict = (f"NOT identical: weights sha256 {r['weights_sha256'][:16]} != recorded "
                   f"{r['original_weights_sha256'][:16]}")
    else:
        verdict = "bit-identical weights are not expected here; metric difference: " + ", ".join(
            f"{k} {v:+.4f}" for k, v in r["metric_difference"].items() if k != "train_examples")
    out.result(r, "\n".join([verdict, *r["notes"]]))
    return 0 if r["identical"] or not r["bit_identity_expected"] else 1


def _runs_ls(args: argparse.Namespace, out: Output) -> int:
    rows = _registry(_open(args)).runs()
    out.table("runs", ["run", "model", "status", "data", "world", "test metric", "weights"],
              [[r["run_id"], r["model"], r["status"], r["dataset_id"], (r["dist"] or {}).get("world_size"),
                _test_metric(r.get("metrics")),
                (r["weights_sha256"] or "")[:12] or None] for r in rows],
              {"runs": rows})
    return 0


def _test_metric(m: dict | None) -> str | None:
    if not m:
        return None
    if "test_mae" in m:
        return f"MAE {m['test_mae']:.3f}"
    return f"{m['test_accuracy']:.3f}" if "test_accuracy" in m else None


LATEST = "latest"


def _run_ref(registry: Any, text: str) -> str:
    """A run id, or ``latest``: the newest run. Raises UserError when there is none."""
    if text != LATEST:
        return text
    runs = registry.runs()
    if not runs:
        raise UserError("no training runs yet: train one first (edgeloop train)")
    return runs[-1]["run_id"]


def _runs_show(args: argparse.Namespace, out: Output) -> int:
    registry = _registry(_open(args))
    r = registry.run(_run_ref(registry, args.run_id))
    out.view(r)
    return 0


def _data_add(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.loop.pipeline import register_dataset

    dataset, dataset_id, created = register_dataset(_registry(_open(args)), args.name, args.path, args.task)
    out.result({"dataset_id": dataset_id, "created": created, "sha256": dataset.sha256, "schema": dataset.schema},
               f"{'registered' if created else 'already registered, unchanged:'} {dataset_id} "
               f"({dataset.schema['rows']} rows of shape {_shape_text(dataset.shape)} ({dataset.layout}), "
               f"{dataset.task}, sha256 {dataset.sha256[:16]})")
    return 0


def _shape_text(shape: Any) -> str:
    return "x".join(str(d) for d in shape)


def _example_data_names() -> list[str]:
    from edgeloop.cloud.examples import EXAMPLE_DATA   # a dict of names: no numpy at start-up
    return sorted(EXAMPLE_DATA)


def _data_example(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.train.example_data import EXAMPLE_DATA, write_example

    path = write_example(args.example, args.dest)
    out.result({"example": args.example, "path": str(path)},
               f"wrote {path} ({EXAMPLE_DATA[args.example]}); register it: edgeloop data add NAME {path}")
    return 0


def _data_ls(args: argparse.Namespace, out: Output) -> int:
    rows = _registry(_open(args)).datasets()
    out.table("data sets", ["data set", "rows", "shape", "task", "classes", "sha256", "path"],
              [[r["dataset_id"], r["schema"]["rows"],
                _shape_text(r["schema"].get("input_shape") or [r["schema"]["features"]]),
                r["schema"].get("task", "classification"), r["schema"]["classes"],
                r["sha256"][:16], r["path"]] for r in rows], {"datasets": rows})
    return 0


def _lineage(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.models import lineage

    chain = lineage(_registry(_open(args)), args.device_id)
    if "update" not in chain:
        out.result(chain, f"{args.device_id}: {chain['note']}")
        return 0
    d, u, mv, run, ds = chain["device"], chain["update"], chain["model_version"], chain["run"], chain["dataset"]
    code = run["code"]
    out.result(chain, "\n".join([
        f"device     {d['device_id']} ({d['tier']}, {d['state']}) runs {d['model_version']}",
        f"update     {u['update_id']} ({u['tier']})",
        f"package    sha256 {chain['package']['sha256'][:16]} ({chain['package']['length']} bytes)",
        f"model      {mv['model_version']} [{mv['stage']}] onnx {mv['onnx_sha256'][:16]}",
        f"run        {run['run_id']} seed {run['params']['seed']}, world size {run['dist']['world_size']}, "
        f"weights {run['weights_sha256'][:16]}",
        f"code       commit {(code['commit'] or 'n/a')[:12]}{' (dirty)' if code['dirty'] else ''}, "
        f"training code {code['training_code_sha256'][:16]}",
        f"data set   {ds['dataset_id']} sha256 {ds['sha256']}"]))
    return 0


def _package(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.fleet.cli_package import package_command

    return package_command(args, out, _open(args), _registry)


def _serve_url(ws: Workspace) -> str:
    from edgeloop.fleet._serve_lock import serving_url   # a stale serve.json is no control plane

    return serving_url(ws.root)


def _publish(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.ingest.control_plane import ControlPlane
    from edgeloop.cloud.loop.pipeline import publish_update

    from edgeloop.fleet.broker import control_plane_link

    ws = _open(args)
    registry = _registry(ws)
    url = args.repository_url or _serve_url(ws)
    link = control_plane_link(ws, args.mqtt, "publish")   # mutual TLS when the workspace has a generated broker
    cp = ControlPlane(registry, link.host, link.port, fleet=ws.fleet, **link.control_plane_kwargs()).start()
    try:
        msg = publish_update(ws, registry, url, args.model_version, args.tier, cp.announce)
    finally:
        cp.stop()
    out.result({"update_id": msg.update_id, "model_version": msg.model_version, "tier": msg.tier,
                "target": msg.target, "sha256": msg.sha256, "repository": msg.repository},
               f"published {msg.model_version} to {msg.tier} devices as update {msg.update_id}")
    return 0


def _serve(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.services import ServiceStack
    from edgeloop.cloud.workspace import parse_host_port
    from edgeloop.fleet.broker import stack_options

    from edgeloop.fleet._serve_lock import ServeLock, SessionLock
    from edgeloop.fleet._signals import StopRequest

    ws = _open(args)
    api = parse_host_port(args.api, "API address", allow_zero=True)
    if args.ingest == "exclusive" and args.ingest_workers > 1:
        raise UserError("--ingest exclusive takes the whole stream on one connection: use --ingest-workers 1")
    # the persistent ingest session is per fleet and worker; mutual TLS when the workspace has a generated broker
    # (a host made with init --join has its own name: two hosts never share a session or client id)
    worker = args.worker or ws.host or "serve"
    session = f"edgeloop-ingest-{ws.fleet}" + ("" if worker == "serve" else f"-{worker}")
    options = stack_options(ws, args.mqtt, worker, ingest_workers=args.ingest_workers, session=session,
                            api=api, shared=args.ingest == "shared")
    # one control plane per workspace: the lock before any port or broker session (fleet/_serve_lock.py);
    # from the moment its services run, a signal only asks the controller loop to stop (fleet/_signals.py)
    with ServeLock(ws.root) as lock, SessionLock(ws, session, worker), ServiceStack(ws, options) as stack, \
            StopRequest() as stop:
        lock.publish(stack.repository_url, stack.api.url, ws.fleet)
        link = options.broker
        if lock.replaced is not None:
            out.info(f"replaced a stale {SERVE_FILE} (pid {lock.replaced.pid}, no longer serving)")
        own = stack.repository.url if stack.repository else stack.repository_url
        public = f" (devices download through {stack.repository_url})" if own != stack.repository_url else ""
        out.info(f"serving {own}{public}, API {stack.api.url}, fleet {ws.fleet}, ingesting from "
                 f"{link.host}:{link.port}{' (mutual TLS)' if link.control_plane_kwargs() else ''} as session {session}"
                 f"{f' with {options.ingest_workers} workers' if options.ingest_workers > 1 else ''} (Ctrl-C to stop)")
        stack.rollouts.run(stop, until=time.time() + args.duration if args.duration else None)
    out.result({"repository_url": stack.repository_url, "api_url": stack.api.url, "fleet": ws.fleet,
                **_ingest_totals([cp.stats.__dict__ for cp in stack.ingest])})
    return 0


def _ingest_totals(stats: list[dict]) -> dict:
    """Every ingest worker's counters, summed (``rejects`` by reason)."""
    total: dict = {}
    for st in stats:
        for k, v in st.items():
            if isinstance(v, dict):
                bucket = total.setdefault(k, {})
                for reason, n in v.items():
                    bucket[reason] = bucket.get(reason, 0) + n
            else:
                total[k] = total.get(k, 0) + v
    return total


@remote_ok
def _models(args: argparse.Namespace, out: Output) -> int:
    rows = remote.client(args).models() if args.server else _registry(_open(args)).model_versions()
    for r in rows:
        r["metrics"] = json.loads(r["metrics"]) if isinstance(r["metrics"], str) else r["metrics"] or {}
    out.table("model versions", ["model version", "stage", "run", "test metric"],
              [[r["model_version"], r["stage"], r["run_id"], _test_metric(r["metrics"]) or "-"]
               for r in rows], {"model_versions": rows})
    return 0


def _models_show(args: argparse.Namespace, out: Output) -> int:
    registry = _registry(_open(args))
    mv = registry.model_version(args.model_version)
    mv["packages"] = registry.packages_of(args.model_version)
    mv.pop("features", None)
    out.view(mv)
    return 0


def _models_promote(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.models import promote

    p = promote(_registry(_open(args)), args.model_version, args.stage, args.tolerance)
    extra = ""
    if p.candidate_accuracy is not None:
        extra = f" (held-out {p.metric} {p.candidate_accuracy:.4f}" + (
            f" vs {p.replaced} {p.production_accuracy:.4f}, now archived)" if p.replaced else ")")
    out.result(p.__dict__, f"{p.model_version}: {p.from_stage} -> {p.to_stage}{extra}")
    return 0


def _models_archive(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.models import promote

    p = promote(_registry(_open(args)), args.model_version, "archived")
    out.result(p.__dict__, f"{p.model_version}: {p.from_stage} -> archived")
    return 0


def _status(args: argparse.Namespace, out: Output) -> int:
    registry = _registry(_open(args))
    devices = registry.devices()
    states: dict[str, int] = {}
    for d in devices:
        states[d["state"]] = states.get(d["state"], 0) + 1
    updates = registry.updates()
    summary = registry.telemetry_summary()
    obj = {"devices": len(devices), "states": states, "latest_model_version": registry.latest_model_version(),
           "latest_update": updates[-1] if updates else None, "telemetry_records": summary["records"],
           "inferences": summary["inferences"], "accuracy": summary["accuracy"]}
    acc = "n/a" if summary["accuracy"] is None else f"{summary['accuracy']:.3f}"
    human = (f"devices: {len(devices)} ({', '.join(f'{k} {v}' for k, v in sorted(states.items())) or 'none'})\n"
             f"latest model version: {obj['latest_model_version'] or '-'}\n"
             f"latest update: {updates[-1]['update_id'] + ' (' + updates[-1]['model_version'] + ')' if updates else '-'}\n"
             f"telemetry: {summary['records']} records, {summary['inferences']} inferences, accuracy {acc}")
    out.result(obj, human)
    return 0


FULL_AGENTS_MAX = 200   # thread-per-device full agents; beyond this the asyncio swarm


def _simulate(args: argparse.Namespace, out: Output) -> int:
    """A fleet that waits: every device serves ``--samples`` requests on each model version it
    installs and stays online until ``--duration`` passes or SIGINT/SIGTERM; exits 0 at the end
    of the duration, 130 on SIGINT, 143 on SIGTERM, after one summary line."""
    if args.engine == "swarm" or (args.engine == "auto" and args.devices > FULL_AGENTS_MAX):
        argv = ["swarm", "--devices", str(args.devices), "--tier-mix", f"{args.tier}:1", "--prefix", args.prefix,
                "--workspace", str(args.workspace), "--sample-rate", str(args.sample_rate)]
        argv += ["--telemetry-s", "10"] if args.sample_rate else []      # swarm devices serve that often
        argv += ["--duration", str(args.duration)] if args.duration is not None else []
        argv += ["--json"] if args.json else []
        argv += ["--mqtt", args.mqtt] if args.mqtt else []
        swarm_args = build_parser().parse_args(argv)
        return swarm_args.fn(swarm_args, out)
    from edgeloop.cloud.train.datasets import load_dataset
    from edgeloop.fleet._signals import StopRequest
    from edgeloop.fleet.cli_swarm import reachable
    from edgeloop.simulators.datastream import DataStream
    from edgeloop.simulators.fleet import FleetSpec, SimulatedFleet

    ws = _open(args)
    _, _, test = load_dataset().split()
    link, own = _device_link(ws, args.mqtt, args.tier)
    reachable(link.host, link.port)
    spec = FleetSpec(devices=args.devices, tier=args.tier, state_root=ws.fleet_dir, mqtt_host=link.host,
                     mqtt_port=link.port, fleet=ws.fleet, image_root=ws.image_repository().trusted_root(),
                     director_root=ws.director_repository().trusted_root(), samples=args.samples,
                     prefix=args.prefix, device_overrides=own, per_version=True,
                     agent_overrides={"sample_rate": args.sample_rate} if args.sample_rate else {})
    fleet = SimulatedFleet(spec, DataStream(test.x, test.y))
    began = time.monotonic()
    with StopRequest() as interrupted:      # from here a signal stops the fleet, even half started
        try:
            fleet.start(should_stop=lambda: interrupted.signum is not None)
        except BaseException:
            fleet.stop(drain_s=0.5)
            raise
        until = "Ctrl-C" if args.duration is None else f"{args.duration:g} s or Ctrl-C"
        if interrupted.signum is None:
            out.info(f"{args.devices} simulated devices online, waiting for updates ({until} to stop)")
        with out.live() as show:
            while not interrupted.wait(_until(began, args.duration, 0.25)):
                show(_fleet_line(fleet))
                if args.duration is not None and time.monotonic() - began >= args.duration:
                    break
            show(_fleet_line(fleet))
        online = fleet.online_count()
        fleet.stop(drain_s=1.0)
    versions = fleet.model_versions()
    obj = {"devices": len(fleet.runs), "online": online, "served": fleet.served_count(),
           "updated": fleet.updated_count(), "model_versions": versions,
           "seconds": round(time.monotonic() - began, 2), "stopped_by": interrupted.name or "duration"}
    running = ", ".join(f"{v} on {n}" for v, n in versions.items())
    out.result(obj, f"{obj['devices']} devices served {obj['served']:,} requests; updated {obj['updated']}/"
                    f"{obj['devices']}; running: {running}; stopped by {obj['stopped_by']} after {obj['seconds']:g} s")
    return interrupted.exit_code


def _until(began: float, duration: float | None, tick: float) -> float:
    """How long to wait for a signal before the next display update (never past the duration)."""
    if duration is None:
        return tick
    return max(0.0, min(tick, began + duration - time.monotonic()))


def _fleet_line(fleet: Any) -> str:
    n = len(fleet.runs)
    return (f"devices online {fleet.online_count()}/{n}, updated {fleet.updated_count()}/{n}, "
            f"served {fleet.served_count():,}")


def _device_link(ws: Workspace, mqtt: str | None, tier: str):  # noqa: ANN202
    """The broker link, and for a workspace with a generated broker each simulated device's own
    mutual-TLS identity (enrolled on first use)."""
    from edgeloop.fleet.broker import control_plane_link
    from edgeloop.fleet.identity import agent_tls, simulated_device_tls

    link = control_plane_link(ws, mqtt, "demo")
    if link.tls is None:
        return link, None
    from edgeloop.fleet.cli_devices import open_fleet
    fleet = open_fleet(ws)
    return link, lambda device_id: agent_tls(simulated_device_tls(ws, fleet, device_id, tier))


def _demo(args: argparse.Namespace, out: Output) -> int:
    if args.loop:
        return _loop_demo(args, out)
    from edgeloop.fleet.demo import DemoOptions, run_demo

    args.devices = args.devices or DemoOptions.devices
    ws = Workspace.init(args.workspace, mqtt=args.mqtt or DEFAULT_MQTT).with_mqtt(args.mqtt)
    if args.example and args.loop:
        raise UserError("--example and --loop are separate demos; choose one")
    opts = DemoOptions(devices=args.devices, samples=args.samples, epochs=args.epochs, timeout_s=args.timeout,
                       prefix=args.prefix, example=args.example)
    out.info(f"edgeloop demo: {args.devices} devices, broker {ws.mqtt_host}:{ws.mqtt_port}, workspace {ws.root}"
             if not (ws.root / "broker" / "broker.json").exists() else
             f"edgeloop demo: {args.devices} devices, the workspace's mutual-TLS broker, workspace {ws.root}")
    from edgeloop.fleet.demo import TIER

    link, own = _device_link(ws, args.mqtt, TIER)
    from edgeloop.fleet._serve_lock import ServeLock

    # the demo runs a control plane: the same one-per-workspace lock as serve
    with ServeLock(ws.root), out.progress() as progress:
        result = run_demo(ws, opts, progress, link, own)
    if args.example:
        out.result(result, _example_text(result))
        return 0 if result["failed"] == 0 else 1
    acc = "n/a" if result["accuracy"] is None else f"{result['accuracy']:.3f}"
    out.result(result, (
        f"model {result['model_version']} (run {result['run_id']}, data sha256 {result['dataset_sha256'][:12]}, "
        f"test accuracy {result['test_accuracy']:.3f})\n"
        f"update {result['update_id']}: {result['updated']}/{result['devices']} devices updated, "
        f"{result['failed']} failed\n"
        f"telemetry: {result['telemetry_records']} records, {result['inferences']} inferences, "
        f"fleet accuracy {acc}\n"
        f"done in {result['seconds']} s"))
    return 0 if result["failed"] == 0 else 1


def _example_text(r: dict) -> str:
    lines = [f"example {r['example']} ({r['task']}): model {r['model_version']} (run {r['run_id']}, "
             f"data sha256 {r['dataset_sha256'][:12]}): {quality_line(r['metrics'])}"]
    for tier, t in sorted(r["tiers"].items()):
        lines.append(f"  {tier:<13} " + (f"packaged, {t['metric']} {t['value']:.4f} (float {t['float_value']:.4f}), "
                                         f"{t['bytes']} bytes" if t["packaged"] else f"refused: {t['reason']}"))
    fleet = (f"fleet MAE {r['fleet_mae']:.3f}" if r.get("fleet_mae") is not None else
             f"fleet anomaly rate {r['fleet_anomaly_rate']:.3f}" if r.get("fleet_anomaly_rate") is not None else
             f"fleet accuracy {r['accuracy']:.3f}" if r.get("accuracy") is not None else "no labelled telemetry")
    drifted = [f"{d['key']} ({d['model_version']})" for d in r["drift"] if d.get("status") in ("drift", "skew")]
    lines += [f"update {r['update_id']}: {r['updated']}/{r['devices']} devices updated, {r['failed']} failed",
              f"telemetry: {r['telemetry_records']} records, {r['inferences']} inferences, {fleet}",
              f"drift: {'drift in ' + ', '.join(drifted) if drifted else 'no drift'} "
              f"({len(r['drift'])} cohort(s) checked)", f"done in {r['seconds']} s"]
    return "\n".join(lines)


def _loop_demo(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.fleet.loop_demo import LoopOptions, run_loop_demo

    devices = args.devices or LoopOptions.devices
    from edgeloop.fleet.broker import stack_options
    from edgeloop.fleet.loop_demo import TIER

    ws = Workspace.init(args.workspace, mqtt=args.mqtt or DEFAULT_MQTT).with_mqtt(args.mqtt)
    link, own = _device_link(ws, args.mqtt, TIER)     # serve's link and share group: one stack (cloud/services.py)
    out.info(f"edgeloop demo --loop: {devices} devices, broker {link.host}:{link.port}"
             f"{' (mutual TLS)' if link.tls else ''}, workspace {ws.root}")
    from edgeloop.fleet._serve_lock import ServeLock

    with ServeLock(ws.root):      # a control plane: one per workspace, as with serve
        r = run_loop_demo(ws, LoopOptions(devices=devices, epochs=args.epochs, timeout_s=args.timeout,
                                          prefix=args.prefix if args.prefix != "demo" else "loop"),
                          lambda stage, msg: out.info(f"{stage}: {msg}"), stack_options(ws, args.mqtt, "demo"), own)

    def acc(phase: dict) -> str:
        return f"{phase['fleet']:.3f} (drifted devices {phase['drifted_devices']:.3f}, others {phase['other_devices']:.3f})"

    out.result(r, "\n".join([
        f"fleet accuracy before drift: {acc(r['accuracy_before_drift'])}",
        f"fleet accuracy after drift:  {acc(r['accuracy_after_drift'])}",
        f"fleet accuracy after {r['v2']}: {acc(r['accuracy_after_v2'])}",
        f"drift flagged on {r['flagged_drifted']}/{r['drifted_devices']} drifted devices, "
        f"{r['flagged_clean']} false alarms; pipeline {r['pipeline_run']} {r['pipeline_status']}, "
        f"rollout {r['rollout_id']}; done in {r['seconds']} s"]))
    return 0 if r["pipeline_status"] == "succeeded" else 1


def _drift_report(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.drift.monitor import drift_report

    cohort = getattr(args, "cohort", "device")
    report = drift_report(_registry(_open(args)), by=cohort)
    out.table(f"drift by {cohort}", [cohort, "model", "status", "inferences", "accuracy", "max PSI",
                                          "drifted feature ids", "predictions drift"],
              [[r["key"], r["model_version"], r["status"], r["inferences"],
                None if r["accuracy"] is None else f"{r['accuracy']:.3f}",
                None if r.get("max_psi") is None else f"{r['max_psi']:.3f} (f{r['max_psi_feature']})",
                _feature_ids(r["drifted_features"]), r.get("prediction_drift")] for r in report], {"report": report})
    return 0


def _feature_ids(indices: list[int], most: int = 8) -> str | None:
    """Feature indices as ids that cannot be read as a count: ``f3,f36`` (``+N more`` past ``most``)."""
    if not indices:
        return None
    more = f" +{len(indices) - most} more" if len(indices) > most else ""
    return ",".join(f"f{i}" for i in indices[:most]) + more


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:      # stderr has its line; with --json, stdout gets the object too
        if "--json" in argv:
            print(error_object(e.message, e.code, e.kind))
        raise
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.ERROR,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = Output(args.json)
    try:
        if getattr(args, "server", None) and not remote.allows_remote(args.fn):
            raise UserError("--server works with: devices [ls|show], models [ls], rollout, audit; run other commands "
                            "on the control plane's workspace")
        return args.fn(args, out)
    except CloudError as e:
        return _failed(out, str(e), e.exit_code, type(e).__name__)
    except KeyboardInterrupt:
        # exiting on an interrupt: one more (a launcher passing Ctrl-C to its process group, a
        # second key press) must not kill the interpreter's teardown by signal instead of exit 130.
        # Only the `edgeloop` process itself keeps ignoring it (run()): a caller of main() in its
        # own process gets its handler back, or every process it started later would inherit
        # an ignored SIGINT and could not be stopped with Ctrl-C
        previous = None
        with contextlib.suppress(ValueError):          # not the main thread: nothing to guard
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return _failed(out, "interrupted", 130, "Interrupted", prefix="edgeloop: ")
        finally:
            if previous is not None and not _own_process:
                signal.signal(signal.SIGINT, previous)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if args.debug:
            raise
        from edgeloop.contracts.codes import ErrorCode
        from edgeloop.device_sdk.errors import AgentError
        code = ServiceUnavailable.exit_code if isinstance(e, AgentError) else EXIT_INTERNAL
        reason = getattr(e, "code", None)
        kind = str(reason) if isinstance(reason, ErrorCode) else type(e).__name__   # an agent's code, else the class
        return _failed(out, f"{type(e).__name__}: {e} (rerun with --debug for details)", code, kind)


def _failed(out: Output, message: str, code: int, kind: str, prefix: str = "edgeloop: error: ") -> int:
    """A failed command: one line on stderr and, with --json, one JSON object on stdout."""
    sys.stderr.write(f"{prefix}{message}\n")
    if out.as_json:
        print(error_object(message, code, kind))
    return code


_own_process = False      # set by run(): main() is this process's whole life


def run() -> None:
    """The ``edgeloop`` program (the console script and ``python -m edgeloop.fleet.cli``)."""
    global _own_process
    _own_process = True
    sys.exit(main())


if __name__ == "__main__":
    run()
