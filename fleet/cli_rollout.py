"""``edgeloop rollout start|ls|status|pause|resume|abort``: staged rollouts (cloud/rollouts/controller.py).

Against the local workspace, ``start`` validates, signs and records the rollout; the running
``edgeloop serve`` drives it (its step loop sends the commands). With ``--server`` every
action goes through the control plane's HTTP API instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

from edgeloop.cloud.errors import UserError
from edgeloop.cloud.workspace import Workspace
from edgeloop.fleet._args import DURATION_HELP, LazyChoices, duration, duration_or_zero
from edgeloop.fleet._output import Output
from edgeloop.fleet.remote import client, remote_ok

if TYPE_CHECKING:
    from edgeloop.cloud.rollouts.controller import RolloutController

__all__ = ["add_rollout_commands"]


def _number(kind: type, low: float, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"{text} must be at least {low:g}")
        return value
    return parse


def add_rollout_commands(sub: Any, group: Callable, action: Callable) -> None:
    rollouts = group(sub, "rollout", "staged rollouts: canary, waves, abort criteria, automatic rollback", _ls)
    p = action(rollouts, "start", "start rolling a model version out to the devices a selector matches", _start)
    p.add_argument("model_version", metavar="MODEL_VERSION")
    p.add_argument("--target", required=True, metavar="SEL",
                   help="tier=T, tag=K=V, group=G, device=ID; commas combine with AND")
    p.add_argument("--strategy", choices=LazyChoices(_strategies), default="all", metavar="STRATEGY",
                   help="%(choices)s (default all)")
    p.add_argument("--canary", metavar="N|P%", help="canary devices (count or share); needed by --strategy canary")
    p.add_argument("--bake-s", type=duration_or_zero, default=0.0, metavar="DURATION",
                   help=f"how long to watch the canary before the waves: {DURATION_HELP} (default 0)")
    p.add_argument("--rate", type=_number(float, 0.001, "a number"), metavar="PER_MIN",
                   help="devices per minute at most (default: no limit)")
    p.add_argument("--growth", type=_number(float, 1, "a number"), default=2.0,
                   help="each wave this many times the previous one (default 2)")
    p.add_argument("--wave-size", type=_number(int, 1, "an integer"),
                   help="first wave (default: the canary's size, or 1)")
    p.add_argument("--max-failure-pct", type=_number(float, 0, "a number"), default=10.0,
                   help="abort when failed devices exceed this share of the finished ones (default 10)")
    p.add_argument("--min-devices", type=_number(int, 1, "an integer"), default=1,
                   help="finished devices before the failure share counts (default 1)")
    p.add_argument("--retries", type=_number(int, 0, "an integer"), default=2,
                   help="extra attempts after a download failure or a timeout (default 2)")
    p.add_argument("--include-offline", action="store_true",
                   help="also select devices whose last status is offline (they count as failed at their deadline)")
    p.add_argument("--timeout-s", type=duration, metavar="DURATION",
                   help=f"per-device deadline: {DURATION_HELP} (default: the tier's in_progress_timeout_s)")
    p.add_argument("--wave-success-pct", type=_number(float, 0.001, "a number"), default=90.0,
                   help="a wave ends once this share of it committed (default 90); its stragglers still count")
    p.add_argument("--wave-timeout-s", type=duration, metavar="DURATION",
                   help=f"a wave ends this long after its first command at the latest: {DURATION_HELP} "
                        "(default: the tier deadline)")
    p.add_argument("--max-error-rate", type=_number(float, 0, "a number"),
                   help="abort if the inference error rate rises by more than this (0.01 = 1 point)")
    p.add_argument("--max-latency-p95-ms", type=_number(float, 0, "a number"),
                   help="abort if p95 latency rises by more than this many ms")
    p.add_argument("--max-prediction-js", type=_number(float, 0, "a number"),
                   help="abort if the prediction histogram moves further than this JS distance (0..1)")
    p.add_argument("--max-confidence-drop", type=_number(float, 0, "a number"),
                   help="abort if mean confidence drops by more than this")
    p.add_argument("--max-quality-drop", type=_number(float, 0, "a number"),
                   help="abort if the task's metric on labelled inferences gets worse by more than this: "
                        "accuracy drop (0.05 = 5 points), or for regression the relative MAE rise (0.1 = 10%%)")
    p.add_argument("--repository-url", help="URL devices download from (default: the running `edgeloop serve`)")
    p.add_argument("--force", action="store_true",
                   help="roll out a version that failed or skipped its promotion gate")
    action(rollouts, "ls", "list rollouts", _ls)
    p = action(rollouts, "status", "one rollout: devices per state, progress, health", _status)
    p.add_argument("rollout_id", metavar="ID", nargs="?", help="default: the newest rollout")
    p.add_argument("--watch", action="store_true",
                   help="follow it until it ends: a line per change (with --json, a JSON object per change); "
                        "Ctrl-C stops watching, the rollout carries on (exit 130)")
    p.add_argument("--interval", type=duration, default=1.0, metavar="DURATION",
                   help=f"time between looks with --watch: {DURATION_HELP} (default 1s)")
    for name, help_ in (("pause", "stop sending (devices in flight still report)"),
                        ("resume", "carry on from where it paused"),
                        ("abort", "stop, and roll the updated devices back to their previous version")):
        p = action(rollouts, name, help_, _act)
        p.add_argument("rollout_id", metavar="ID")
        if name == "abort":
            p.add_argument("--reason", default="aborted by the operator")


def _strategies() -> tuple[str, ...]:
    from edgeloop.cloud.rollouts.controller import STRATEGIES

    return STRATEGIES


def _controller(args: argparse.Namespace, url: str | None = None) -> RolloutController:
    from edgeloop.cloud.registry import Registry
    from edgeloop.cloud.rollouts.controller import RolloutController

    ws = Workspace.open(args.workspace)
    return RolloutController(ws, Registry(ws.store_location), _no_sender, repository_url=url)


def _no_sender(device_id: str, command: Any) -> None:
    raise UserError("this command does not send; the running `edgeloop serve` does")


def _serve_url(args: argparse.Namespace) -> str:
    from edgeloop.fleet._serve_lock import serving_url   # a stale serve.json is no control plane

    return serving_url(Workspace.open(args.workspace).root)


@remote_ok
def _start(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.rollouts.controller import RolloutSpec
    spec = RolloutSpec(model_version=args.model_version, target=args.target, strategy=args.strategy,
                       canary=args.canary, bake_s=args.bake_s, rate_per_min=args.rate, growth=args.growth,
                       wave_size=args.wave_size, max_failure_pct=args.max_failure_pct, min_devices=args.min_devices,
                       retries=args.retries, timeout_s=args.timeout_s, max_error_rate=args.max_error_rate,
                       max_latency_p95_ms=args.max_latency_p95_ms, max_prediction_js=args.max_prediction_js,
                       max_confidence_drop=args.max_confidence_drop, max_quality_drop=args.max_quality_drop,
                       include_offline=args.include_offline, force=args.force,
                       wave_success_pct=args.wave_success_pct, wave_timeout_s=args.wave_timeout_s)
    if args.server:
        status = client(args).start_rollout(spec.to_obj())
    else:
        spec.validate()
        ctl = _controller(args, args.repository_url or _serve_url(args))
        status = ctl.status(ctl.create(spec))
    out.result(status, f"rollout {status['rollout_id']}: {status['model_version']} to {status['total']} devices "
                       f"({args.strategy}); follow it with: edgeloop rollout status {status['rollout_id']}")
    return 0


@remote_ok
def _ls(args: argparse.Namespace, out: Output) -> int:
    rows = client(args).rollouts() if args.server else _controller(args).list()
    out.table("rollouts", ["rollout", "model", "target", "strategy", "state", "devices", "committed", "failed",
                           "progress", "created"],
              [[r["rollout_id"], r["model_version"], r["target"], r["spec"]["strategy"], r["state"], r["total"],
                r["counts"]["committed"], r["counts"]["failed"] + r["counts"]["timed_out"],
                f"{100 * r['progress']:.0f}%", time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created_at"]))]
               for r in rows], {"rollouts": rows})
    return 0


@remote_ok
def _status(args: argparse.Namespace, out: Output) -> int:
    ctl = None if args.server else _controller(args)
    if args.rollout_id is None:
        ids = [r["rollout_id"] for r in client(args).rollouts()] if ctl is None else ctl.registry.rollout_ids()
        if not ids:
            raise UserError("no rollouts yet: start one (edgeloop rollout start MODEL_VERSION --target SEL)")
        args.rollout_id = ids[0]     # newest first

    def fetch() -> dict[str, Any]:
        return client(args).rollout(args.rollout_id) if ctl is None else ctl.status(args.rollout_id)
    if args.watch:
        return _watch(fetch, args.rollout_id, args.interval, out)
    _print_status(fetch(), out)
    return 0


ENDED = ("completed", "aborted")
_CHANGES = ("state", "counts", "reason", "total", "commands_resent")   # what a watcher is told about


def _watch(fetch: Callable[[], dict[str, Any]], rollout_id: str, interval: float, out: Output) -> int:
    """``status --watch``: look every ``interval`` seconds; on each change print one line (with
    --json, the whole status as one JSON object) until the rollout ends (exit 0, whatever its
    end). Ctrl-C stops watching and leaves the rollout running (exit 130, one line saying so)."""
    from edgeloop.fleet._signals import StopRequest

    last: dict[str, Any] | None = None
    state = "unknown"
    with StopRequest() as stop:          # Ctrl-C is only noted; the loop ends between two looks
        while not stop.is_set():
            r = fetch()
            state = r["state"]
            seen = {k: r.get(k) for k in _CHANGES}
            if seen != last:
                last = seen
                if out.as_json:
                    print(json.dumps(r, sort_keys=True, default=str), flush=True)
                else:
                    out.info(_progress_line(r))
            if state in ENDED:
                return 0
            stop.wait(interval)
        sys.stderr.write(f"edgeloop: stopped watching; rollout {rollout_id} is still {state} and carries on "
                         f"(stop it with: edgeloop rollout abort {rollout_id})\n")
        return stop.exit_code


def _progress_line(r: dict[str, Any]) -> str:
    c = r["counts"]
    final = r["total"] - c["pending"] - c["sent"] - c["rolling_back"]
    return (f"{time.strftime('%H:%M:%S')} rollout {r['rollout_id']}: {r['state']}, {final}/{r['total']} devices done "
            f"(committed {c['committed']}, failed {c['failed'] + c['timed_out']}, in flight {c['sent']}, "
            f"waiting {c['pending']})" + (f"; reason: {r['reason']}" if r.get("reason") else ""))


def _print_status(r: dict[str, Any], out: Output) -> None:
    from edgeloop.cloud.rollouts.controller import DEVICE_STATES

    if out.as_json:
        out.result(r)
        return
    out.info(f"rollout {r['rollout_id']}: {r['model_version']} to {r['target']} ({r['spec']['strategy']}), "
             f"{r['state']}, {100 * r['progress']:.0f}% done, failures {r['failure_pct']:.1f}%"
             + (f"; reason: {r['reason']}" if r.get("reason") else ""))
    out.table("devices per state", ["state", "devices"],
              [[s, r["counts"][s]] for s in DEVICE_STATES if r["counts"][s]], r)
    health = r.get("health")
    if health and health.get("evaluated"):
        out.info(f"health: error rate {health['error_rate_increase']:+.4f}, latency p95 "
                 f"{health['latency_p95_increase_ms']:+.2f} ms, prediction JS {health['prediction_js']:.3f}, "
                 f"confidence {-health['confidence_drop']:+.3f}")


@remote_ok
def _act(args: argparse.Namespace, out: Output) -> int:
    name = args.action
    if args.server:
        r = client(args).rollout_action(args.rollout_id, name, getattr(args, "reason", None))
    else:
        ctl = _controller(args)
        if name == "abort":
            ctl.abort(args.rollout_id, reason=args.reason)
        else:
            getattr(ctl, name)(args.rollout_id)
        r = ctl.status(args.rollout_id)
    out.result(r, f"rollout {r['rollout_id']} is now {r['state']}")
    return 0
