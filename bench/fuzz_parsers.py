"""Every parser of untrusted input against 100,000 generated inputs each (by default).

The targets and their allowed errors are tests/fuzz_targets.py's (the suite runs 1,000 each
through hypothesis, which shrinks a failure to its smallest input). This bench is a fast
mutation fuzzer over the same targets: each input is arbitrary bytes, arbitrary JSON (nested,
huge numbers, wrong types), a deeply nested document, or a valid seed document with fields
replaced, removed or nested, or with bytes flipped. It counts inputs that raised anything but
the target's own errors (``unexpected``, must be 0) and the slowest single parse (``max_s``).

    .venv/bin/python bench/fuzz_parsers.py [--n 100000] [--seed 1]

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import struct
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import fuzz_targets as ft  # noqa: E402

_STRINGS = ["", "0", "-1", "1e400", "NaN", "\x00", "../../etc/passwd", "a" * 300, "édge", "upd-0123456789ab"]


def rand_json(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 4 or r < 0.45:
        return rng.choice([None, True, False, rng.randint(-2 ** 70, 2 ** 70), 10 ** rng.randint(20, 4000),
                           rng.uniform(-1e308, 1e308), rng.choice(_STRINGS), "".join(chr(rng.randint(0, 0x2FFF))
                                                                                     for _ in range(rng.randint(0, 12)))])
    if r < 0.7:
        return [rand_json(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {rng.choice(_STRINGS + ["schema", "seq", "state", "files", "ops"]): rand_json(rng, depth + 1)
            for _ in range(rng.randint(0, 5))}


def nested(rng: random.Random) -> bytes:
    depth = rng.choice([60, 1000, 5000, 200_000])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    return (opener * depth + "1" + closer * depth).encode()


def mutate_doc(rng: random.Random, seeds: list[dict[str, Any]]) -> bytes:
    doc = json.loads(json.dumps(rng.choice(seeds)))
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(sorted(doc) + ["extra"])
        action = rng.random()
        if action < 0.25:
            doc.pop(key, None)
        elif action < 0.5 and isinstance(doc.get(key), dict) and doc[key]:
            doc[key][rng.choice(sorted(doc[key]))] = rand_json(rng)
        else:
            doc[key] = rand_json(rng)
    return json.dumps(doc).encode()


def flip(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] ^= rng.randint(1, 255)
    return bytes(out)


def json_input(seeds: list[dict[str, Any]]) -> Callable[[random.Random], bytes]:
    def make(rng: random.Random) -> bytes:
        r = rng.random()
        if r < 0.15:
            return rng.randbytes(rng.randint(0, 300))
        if r < 0.35:
            return json.dumps(rand_json(rng)).encode()
        if r < 0.40:
            return nested(rng)
        if r < 0.55:
            return flip(rng, json.dumps(rng.choice(seeds)).encode())
        return mutate_doc(rng, seeds)
    return make


def package_input(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.2:
        return rng.randbytes(rng.randint(0, 2048))
    manifest = mutate_doc(rng, [ft._manifest_obj()]) if r < 0.8 else json.dumps(ft._manifest_obj()).encode()
    members = [(ft.MANIFEST, manifest), ("model.onnx", b"abc"), ("golden.npz", b"abc")]
    if rng.random() < 0.2:
        members.append((rng.choice(["../x", "a/b", "model.onnx", "x" * 90]), rng.randbytes(8)))
    try:
        data = ft._tar(members)
    except (ValueError, UnicodeError):
        return b""
    return flip(rng, data) if rng.random() < 0.4 else data


def block_input(rng: random.Random) -> bytes:
    header = rng.choice([json.dumps(rand_json(rng)).encode(), nested(rng), rng.randbytes(rng.randint(0, 64)),
                         json.dumps({"request_id": "r", "path": "p", "index": rand_json(rng),
                                     "total_size": rand_json(rng), "status": "ok"}).encode()])
    declared = len(header) if rng.random() < 0.7 else rng.randint(0, 65535)
    return struct.pack(">H", declared % 65536) + header + rng.randbytes(rng.randint(0, 64))


def delta_input(rng: random.Random) -> tuple[bytes, bytes]:
    import hashlib
    base = rng.randbytes(rng.randint(0, 64))
    r = rng.random()
    if r < 0.2:
        return base, rng.randbytes(rng.randint(0, 256))
    if r < 0.3:
        header = nested(rng)
    else:
        body = {"format": ft.delta.FORMAT, "base_sha256": hashlib.sha256(base).hexdigest(),
                "target_sha256": "0" * 64, "target_length": rng.choice([rng.randint(-5, 100), rand_json(rng)]),
                "ops": rng.choice([[[rng.choice(["copy", "data", "x"]), rng.randint(-3, 80), rng.randint(-3, 80)]
                                    for _ in range(rng.randint(0, 4))], rand_json(rng)])}
        if rng.random() < 0.3:
            body[rng.choice(sorted(body))] = rand_json(rng)
        header = json.dumps(body).encode()
    return base, zlib.compress(struct.pack(">I", len(header)) + header + rng.randbytes(rng.randint(0, 64)))


def pipeline_input(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.1:
        return rng.randbytes(rng.randint(0, 300))
    if r < 0.15:
        depth = rng.choice([60, 1000, 5000])      # tomllib takes ~2 s to refuse 100,000
        return ("[pipeline]\nname = 'x'\n[train]\nepochs = " + "[" * depth + "1" + "]" * depth).encode()
    doc = json.loads(json.dumps(ft._valid_pipeline))
    for _ in range(rng.randint(1, 3)):
        section = rng.choice(sorted(doc) + ["extra"])
        if rng.random() < 0.2:
            doc.pop(section, None)
        elif rng.random() < 0.7 and isinstance(doc.get(section), dict):
            key = rng.choice(sorted(doc[section]) + ["extra", "model_version", "nproc_per_node"])
            doc[section][key] = rand_json(rng)
        else:
            doc[section] = rand_json(rng)
    data = ft.toml_doc(doc)
    return flip(rng, data) if rng.random() < 0.2 else data


_api_bodies = json_input([ft._valid_rollout, ft._valid_token, ft._valid_abort])

GENERATORS: dict[str, Callable[[random.Random], Any]] = {
    "mqtt message (device and cloud, json)": json_input(ft._valid_messages()),
    "mqtt message (control plane, orjson)": json_input(ft._valid_messages()),
    "package archive": package_input,
    "package manifest": json_input([ft._manifest_obj()]),
    "block request": json_input([ft._valid_block_request]),
    "block": block_input,
    "delta": delta_input,
    "api body: rollout start": json_input([ft._valid_rollout]),
    "api body: token create": json_input([ft._valid_token]),
    "api over http (real server thread)": lambda rng: (rng.choice(ft.API_ENDPOINTS), _api_bodies(rng)),
    "pipeline file (toml)": pipeline_input,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="inputs per parser (default 100,000)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    per_target, unexpected, max_s, examples = {}, 0, 0.0, []
    missing = [t.name for t in ft.TARGETS if t.name not in GENERATORS]
    if missing:
        print(f"fuzz_parsers: no generator for {missing}", file=sys.stderr)
        return 2
    for target in ft.TARGETS:
        make = GENERATORS[target.name]
        warm = random.Random(0)             # first call imports the parser's modules: not a parse time
        try:
            target.parse(make(warm))
        except Exception:  # noqa: BLE001 - counted in the loop below, where it counts
            pass
        bad, slowest, t_start = 0, 0.0, time.perf_counter()
        for _ in range(args.n):
            data = make(rng)
            t0 = time.perf_counter()
            try:
                target.parse(data)
            except target.allowed:
                pass
            except Exception:  # noqa: BLE001 - what this bench looks for
                bad += 1
                if len(examples) < 5:
                    examples.append({"target": target.name, "error": traceback.format_exc(limit=2)[-300:],
                                     "input": repr(data)[:200]})
            slowest = max(slowest, time.perf_counter() - t0)
        per_target[target.name] = {"inputs": args.n, "unexpected": bad, "max_s": round(slowest, 4),
                                   "s": round(time.perf_counter() - t_start, 1)}
        print(f"{target.name:40s} {args.n:>8,} inputs  unexpected {bad}  slowest {slowest * 1000:.1f} ms", flush=True)
        unexpected += bad
        max_s = max(max_s, slowest)
    print(json.dumps({"inputs": args.n * len(ft.TARGETS), "parsers": len(ft.TARGETS), "unexpected": unexpected,
                      "max_s": round(max_s, 4), "per_parser": per_target, "examples": examples,
                      "machine": {"cores": __import__("os").cpu_count(), "python": platform.python_version()}},
                     sort_keys=True))
    return 0 if unexpected == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
