"""``edgeloop package``: build per-tier packages, optionally report and export them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from edgeloop.cloud.errors import UserError
from edgeloop.cloud.workspace import Workspace
from edgeloop.fleet._output import Output

__all__ = ["package_command", "export_triton", "export_c"]


def export_triton(package: bytes, folder: Path) -> list[str]:
    """Write a gpu-server package's Triton model repository layout into ``folder``."""
    from edgeloop.contracts.package import read_package

    bundle = read_package(package)
    layout = bundle.manifest.layout.get("triton")
    if not layout:
        raise UserError(f"the {bundle.manifest.tier} package has no Triton layout (only gpu-server packages do)")
    written = []
    for rel, member in sorted(layout.items()):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bundle.files[member])
        written.append(str(path))
    return written


def export_c(package: bytes, folder: Path) -> list[str]:
    """Write an mcu package's AOT C library (model.c, model.h, edgeloop_kernels.c/.h) into
    ``folder``, for a firmware build. Refuses to overwrite a different file there."""
    from edgeloop.contracts.package import read_package

    bundle = read_package(package)
    layout = bundle.manifest.layout.get("aot")
    if not layout:
        why = bundle.manifest.measured.get("aot_refused") or "only mcu packages carry one"
        raise UserError(f"the {bundle.manifest.tier} package has no AOT C library: {why}")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, member in sorted(layout.items()):
        if name == "prefix":
            continue
        path, data = folder / name, bundle.files[member]
        if path.exists() and path.read_bytes() != data:
            raise UserError(f"{path} exists with other contents; move it away or export elsewhere")
        path.write_bytes(data)
        written.append(str(path))
    return written


SHIPPED_ORDER = ("gpu-server", "edge-gateway", "mobile", "mcu")   # fp32 first: the rest compare with it


def _tier_order(name: str) -> tuple[int, str]:
    return (SHIPPED_ORDER.index(name) if name in SHIPPED_ORDER else len(SHIPPED_ORDER), name)


def package_command(args: argparse.Namespace, out: Output, ws: Workspace, registry_for: Callable) -> int:
    """Package one tier, or every tier with ``--tier all``: there a tier whose artifact does not
    fit is reported (and nothing registered for it) while the other tiers are still packaged,
    and the command exits 2."""
    from edgeloop.cloud.loop.pipeline import package_model
    from edgeloop.cloud.package.tier_packagers import DoesNotFit
    from edgeloop.cloud.package.tiers import load_tiers

    registry = registry_for(ws)
    tiers = sorted(load_tiers(ws.root), key=_tier_order) if args.tier == "all" else [args.tier]
    rows: list[dict[str, Any]] = []
    refused: list[dict[str, str]] = []
    with out.progress() as progress:
        for i, tier in enumerate(tiers):
            progress("package", i, len(tiers))
            try:
                result = package_model(ws, registry, args.model_version, tier)
            except DoesNotFit as e:
                if args.tier != "all":
                    raise
                refused.append({"tier": tier, "reason": str(e)})
                continue
            m = result.manifest
            rows.append({"tier": tier, "format": m.numeric_format, "runtime": m.runtime, "sha256": result.sha256,
                         "bytes": len(result.data), "target": result.target_path, **m.measured, **result.timings})
            if args.export_triton and tier == "gpu-server":
                rows[-1]["triton_files"] = export_triton(result.data, args.export_triton)
            if args.export_c and m.runtime == "tflite-micro":
                rows[-1]["c_files"] = export_c(result.data, args.export_c)
            progress("package", i + 1, len(tiers))
    fp32 = registry.model_version(args.model_version)["metrics"].get("test_accuracy")
    base_bytes = next((r["model_bytes"] for r in rows if r["tier"] == "gpu-server"), None)
    for r in rows:
        r["size_ratio_vs_fp32"] = round(r["model_bytes"] / base_bytes, 3) if base_bytes else None
        r["accuracy_drop_points"] = round((fp32 - r["accuracy"]) * 100, 2) if fp32 is not None else None
    obj = {"model_version": args.model_version, "fp32_accuracy": fp32, "packages": rows, "refused": refused}
    status = 2 if refused else 0
    if args.tier != "all" and not args.report:
        r = rows[0]
        obj.update({k: r[k] for k in ("tier", "sha256", "bytes", "target")})
        out.result(obj, f"packaged {args.model_version} for {r['tier']}: {r['bytes']} bytes, sha256 {r['sha256'][:16]}, "
                        f"held-out accuracy {r['accuracy']:.4f}")
        return 0
    if out.as_json:
        out.result(obj)
        return status
    out.info(f"{args.model_version}: float (fp32 PyTorch) held-out accuracy {_fmt(fp32, '.4f')}; "
             "each package measured on its own runtime")
    out.table("packages", ["tier", "format", "runtime", "model bytes", "size vs fp32", "metric", "float",
                           "accuracy change (points)",
                           "agree with float", "host p50 ms", "device ms", "RAM", "flash"],
              [[r["tier"], r["format"], r["runtime"], r["model_bytes"], _fmt(r["size_ratio_vs_fp32"], ".3f"),
                f"{r.get('metric', 'accuracy')} {r.get('metric_value', r['accuracy']):.4f}",
                _fmt(r.get("metric_value_float"), ".4f"), _change(r["accuracy_drop_points"]),
                f"{r['top1_agreement_with_float']:.4f}", r["host_p50_ms"], r["device_latency_ms"],
                _size(r["ram_bytes"]), _size(r["flash_bytes"])] for r in rows], obj)
    mcu = [r for r in rows if r["runtime"] == "tflite-micro"]
    if mcu:
        out.table("microcontroller memory", ["tier", "TFLM arena (smallest that runs)", "TFLM's own report",
                                              "AOT RAM (emulated M4)", "AOT flash", "layout transposes folded", "operators"],
                  [[r["tier"], _bytes(r.get("ram_bytes")), _bytes(r.get("tflm_reported_arena_bytes")),
                    _bytes(r.get("aot_ram_bytes")), _bytes(r.get("aot_flash_bytes")),
                    r.get("folded_layout_transposes", 0), ", ".join(r.get("operators", []))] for r in mcu], obj)
        for r in mcu:
            if r.get("aot_refused"):
                out.info(f"{r['tier']}: no AOT library, the package runs on TFLM: {r['aot_refused']}")
            elif r.get("aot_bitexact_tflm"):
                out.info(f"{r['tier']}: AOT library bit-exact to TFLM on {r['aot_vectors_checked']} vectors on "
                         f"{r['aot_board']}, {r['aot_instructions']} instructions per inference")
    for r in refused:
        out.err.print(f"edgeloop: error: {r['tier']} not packaged: {r['reason']}")
    return status


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _change(drop_points: float | None) -> str:
    """A drop in accuracy points as a signed change against fp32: ``-0.42`` scored lower, ``+0.28``
    scored higher, ``0.00`` the same (never a negative "drop" that means a gain)."""
    if drop_points is None:
        return "-"
    change = -drop_points
    return "0.00" if abs(change) < 0.005 else f"{change:+.2f}"


def _bytes(n: int | None) -> str:
    return "-" if n is None else f"{n:,} B"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MB"
