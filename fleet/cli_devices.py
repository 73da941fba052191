"""``edgeloop devices [ls|show|enroll|provision|revoke]`` and ``edgeloop broker config|up|down|status``:
the fleet's devices, their certificates, and the mutual-TLS broker they connect to."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from edgeloop.cloud.workspace import Workspace
from edgeloop.fleet import remote
from edgeloop.fleet._output import Output
from edgeloop.fleet._parser import Parser, ShowByDefault, action, common, group
from edgeloop.fleet._workspace import ago, open_registry, open_workspace
from edgeloop.fleet.remote import remote_ok

__all__ = ["add_broker_commands", "add_devices_commands", "open_fleet"]


def _device_filters(p: argparse.ArgumentParser, inherit: bool = False) -> None:
    d = argparse.SUPPRESS if inherit else None
    p.add_argument("--tier", default=d)
    p.add_argument("--state", default=d, help="filter by state (online, committed, failed, offline, ...)")
    p.add_argument("--tag", action="append", default=d, metavar="KEY=VALUE", help="filter by tag (repeatable)")
    p.add_argument("--group", default=d, help="filter by group")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--online", dest="online", action="store_const", const=True, default=d, help="only online devices")
    g.add_argument("--offline", dest="online", action="store_const", const=False, default=d,
                   help="only offline devices")


def add_devices_commands(sub: Any) -> None:
    p = sub.add_parser("devices", help="list, show, enroll, provision and revoke devices",
                       description="list devices (the default), show one (`devices DEVICE`), enroll, provision or revoke one")
    common(p)
    _device_filters(p)
    p.set_defaults(fn=_devices_ls)
    devices = p.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser, action=ShowByDefault)
    _device_filters(action(devices, "ls", "list devices, with filters", _devices_ls), inherit=True)
    action(devices, "show", "show one device in full", _devices_show).add_argument("device_id", metavar="DEVICE")
    p = action(devices, "enroll", "issue a device its certificate (or sign its CSR) and register it",
                _devices_enroll)
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument("--tier", help="its hardware tier, for example edge-gateway")
    p.add_argument("--hardware", metavar="PROFILE", help="its hardware profile, for example rpi4-4gb")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="a tag (repeatable)")
    p.add_argument("--group", action="append", default=[], metavar="GROUP", help="a group it belongs to (repeatable)")
    p.add_argument("--csr", type=Path, metavar="FILE", help="sign this PEM CSR: the device keeps its own key")
    p.add_argument("--out", type=Path, metavar="DIR", help="identity folder (default: WORKSPACE/devices/DEVICE_ID)")
    p = action(devices, "provision", "write one device's provisioning bundle: identity, fleet CA, trusted roots, "
               "broker (enrolls it first if needed)", _devices_provision)
    p.add_argument("device_id", metavar="DEVICE_ID")
    p.add_argument("--out", type=Path, required=True, metavar="DIR|FILE.tar",
                   help="the bundle: a folder, or a tar file (name ending in .tar)")
    p.add_argument("--tier", help="its hardware tier, for example edge-gateway (when it is enrolled here)")
    p.add_argument("--hardware", metavar="PROFILE", help="its hardware profile (when it is enrolled here)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="a tag (repeatable)")
    p.add_argument("--group", action="append", default=[], metavar="GROUP", help="a group it belongs to (repeatable)")
    p.add_argument("--csr", type=Path, metavar="FILE", help="sign this PEM CSR: the device keeps its own key, "
                   "the bundle carries none")
    p.add_argument("--broker", metavar="HOST:PORT", help="the address the device dials (default: the generated "
                   "broker's; its certificate must name HOST: broker config --san HOST)")
    p.add_argument("--repository-url", metavar="URL", help="recorded in the manifest (default: the running "
                   "serve's); devices take the repository from each announcement")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p = action(devices, "revoke", "revoke a device's certificate (CRL) and cut it off the broker", _devices_revoke)
    p.add_argument("device_id", metavar="DEVICE_ID")


def add_broker_commands(sub: Any) -> None:
    broker = group(sub, "broker", "generate, start and stop the fleet's mutual-TLS Mosquitto broker", _broker_status)
    p = action(broker, "config", "write the Mosquitto configuration and ACL (certificates issued as needed)",
                _broker_config)
    p.add_argument("--port", type=int, help="TLS listener port (default: the last configured, else 8883)")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="where to write it (default: WORKSPACE/broker/mosquitto.conf)")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--san", action="append", default=[], metavar="HOST",
                   help="another name or IP devices dial, for the server certificate (repeatable; "
                        "default: the last given)")
    p = action(broker, "up", "start Mosquitto in the background with the generated configuration", _broker_up)
    p.add_argument("--port", type=int, help="TLS listener port (default: the last configured, else 8883)")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--san", action="append", default=[], metavar="HOST",
                   help="another name or IP devices dial, for the server certificate (repeatable; "
                        "default: the last given)")
    action(broker, "down", "stop the workspace's broker", _broker_down)
    action(broker, "status", "is the workspace's broker running, and where", _broker_status)


def open_fleet(ws: Workspace):  # noqa: ANN201
    """The workspace's fleet registry (devices, certificates, tags and groups)."""
    from edgeloop.cloud.fleet_registry import FleetRegistry
    return FleetRegistry(open_registry(ws))


@remote_ok
def _devices_ls(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.fleet_registry import DeviceFilter
    from edgeloop.fleet.identity import parse_tags

    where = DeviceFilter(tier=getattr(args, "tier", None), state=getattr(args, "state", None),
                         tags=parse_tags(getattr(args, "tag", None) or []), group=getattr(args, "group", None),
                         online=getattr(args, "online", None))
    rows = remote.client(args).devices(where.tier, where.state, where.tags, where.group, where.online) \
        if args.server else open_fleet(open_workspace(args)).devices(where)
    out.table("devices", ["device", "tier", "state", "online", "model", "target", "groups", "last seen",
                          "clock", "reason / last error"],
              [[d["device_id"] + (" (revoked)" if d["revoked"] else ""), d["tier"], d["state"],
                "yes" if d["online"] else "no", d["model_version"], d["target_model_version"],
                ",".join(d["groups"]) or None, ago(d["last_seen"]) if d["last_seen"] else "never",
                _clock(d.get("clock_offset_s")), d["reason"] or d["last_error"]] for d in rows], {"devices": rows})
    return 0


def _clock(offset_s: float | None) -> str | None:
    """How far the device's clock is off the control plane's signed time (its status's
    ``clock_offset_s`` is signed time minus device clock: a device ahead shows ``+``)."""
    if offset_s is None:
        return None
    ahead = -offset_s
    if abs(ahead) < 1.0:
        return "ok"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if abs(ahead) >= size:
            return f"{ahead / size:+.1f}{unit}"
    return f"{ahead:+.0f}s"


@remote_ok
def _devices_show(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.api.server import device_detail

    device = remote.client(args).device(args.device_id) if args.server \
        else device_detail(open_fleet(open_workspace(args)), args.device_id)
    out.view(device)
    return 0


def _devices_enroll(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.fleet.identity import enroll, enrolment_from

    ws = open_workspace(args)
    req = enrolment_from(args.device_id, args.tier, args.hardware, args.tag, args.group, args.csr)
    r = enroll(ws, open_fleet(ws), req, args.out)
    note = "; move device.key onto the device and delete it here" if r.key_generated else ""
    out.result({**r.__dict__, "folder": str(r.folder)},
               f"enrolled {r.device_id}: certificate serial {r.serial[:16]}, valid until "
               f"{time.strftime('%Y-%m-%d', time.gmtime(r.not_after))}; identity folder {r.folder}: "
               f"{', '.join(r.files)}{note}")
    return 0


def _devices_provision(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.fleet.identity import enrolment_from
    from edgeloop.fleet.provision import provision_device

    ws = open_workspace(args)
    req = enrolment_from(args.device_id, args.tier, args.hardware, args.tag, args.group, args.csr)
    r = provision_device(ws, open_fleet(ws), req, args.out, force=args.force, broker=args.broker,
                         repository_url=args.repository_url)
    how = "enrolled" if r.enrolled else "already enrolled, certificate re-used"
    key = "" if r.key_included else "; no device.key inside: the device uses its own (edgeloop-gateway --tls-key)"
    out.result({**r.__dict__, "out": str(r.out)},
               f"provisioned {r.device_id} ({how}, serial {r.serial[:16]}) for fleet {r.fleet}, broker "
               f"mqtts://{r.broker}: {r.out}{key}; keep it secret, copy it to the device and start it: "
               f"edgeloop-gateway --bundle {r.out.name} --state-dir /var/lib/edgeloop")
    return 0


def _devices_revoke(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.fleet.broker import apply_revocations
    from edgeloop.fleet.identity import revoke

    ws = open_workspace(args)
    fleet = open_fleet(ws)
    r = revoke(ws, fleet, args.device_id)
    broker = apply_revocations(ws, fleet)
    out.result({**r.__dict__, "broker": broker},
               f"{r.device_id}: certificate {r.serial[:16]} {'was already' if r.already_revoked else 'is now'} "
               f"revoked; broker {broker}")
    return 0


def _broker_config(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.fleet.broker import describe, write_config

    ws = open_workspace(args)
    cfg = write_config(ws, open_fleet(ws), args.port, args.out, args.bind, args.san)
    out.result(describe(cfg), f"wrote {cfg.conf} and {cfg.acl}: mutual-TLS listener on {cfg.address} "
                              f"(start it: edgeloop broker up)")
    return 0


def _broker_up(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.fleet.broker import start

    ws = open_workspace(args)
    st = start(ws, open_fleet(ws), args.port, args.bind, args.san)
    out.result({**st.__dict__, "conf": str(st.conf), "log": str(st.log)},
               f"broker {'already ' if st.already_running else ''}running (pid {st.pid}) at mqtts://{st.address}; "
               f"log {st.log}")
    return 0


def _broker_down(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.fleet.broker import stop

    pid = stop(open_workspace(args))
    out.result({"stopped": pid}, f"stopped the broker (pid {pid})" if pid else "no broker was running")
    return 0


def _broker_status(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.fleet.broker import status

    st = status(open_workspace(args))
    out.result(st, f"broker running (pid {st['pid']}) at mqtts://{st['address']}" if st["pid"]
               else "no broker running for this workspace (start one: edgeloop broker up)")
    return 0
