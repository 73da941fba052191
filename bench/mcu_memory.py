"""Microcontroller memory: TFLite Micro's true minimum arena against the AOT C library's peak
RAM on an emulated Cortex-M4, for the four MLPerf Tiny reference shapes.

Models (PyTorch, random weights: memory and exactness do not depend on them; accuracy comes from
the digits models in the suite): KWS DS-CNN (49x10x1), VWW MobileNetV1-0.25 (96x96x3), IC
ResNet-8 (32x32x3), AD FC autoencoder (640). Each goes through the mcu tier's converter and
operator check (full int8, layout transposes folded), then:

- TFLM arena: the smallest arena TFLM allocates and invokes it in (child-process bisection,
  cloud/package/tflm_arena.py), with TFLM's own report beside it;
- AOT: kernels/aot compiles it to C99, kernels/firmware builds it for qemu's mps2-an386 and runs
  it on 8 random int8 vectors; outputs must equal TFLM's bit for bit. AOT peak RAM = the
  library's data + bss (the planned arena is there) + the stack it used (painted); flash = its
  text + rodata + data, against the .tflite's size; instructions per inference from the QEMU
  plugin (a relative speed figure, not cycles).

Last line: ``{"models": {...}, "aot_ram_ratio_max": ..., "aot_bitexact_all": true,
"qemu_ran_all": true}``. Goal: AOT peak RAM at most 0.6x TFLM's arena on every model.

    .venv/bin/python bench/mcu_memory.py
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from edgeloop.cloud.package.aot_firmware import AotRefused, prove_on_cortex_m4  # noqa: E402
from edgeloop.cloud.package.export import export_onnx  # noqa: E402
from edgeloop.cloud.package.tier_packagers import captured_output, check_operators, convert, tflm_arena_measured  # noqa: E402
from edgeloop.cloud.package.tiers import load_tiers  # noqa: E402
from edgeloop.contracts.features import FeatureSpec  # noqa: E402
from ota_bytes import DSCNN  # noqa: E402
from tier_latency import AutoEncoder, ResNet8  # noqa: E402


class MobileNetV1(nn.Module):
    """MLPerf Tiny visual wake words: MobileNetV1, width 0.25, 96x96x3, 2 classes."""

    def __init__(self, alpha: float = 0.25) -> None:
        super().__init__()

        def c(n: int) -> int:
            return max(8, int(n * alpha))
        cfg = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
        layers: list[nn.Module] = [nn.Conv2d(3, c(32), 3, 2, 1), nn.ReLU6()]
        cin = c(32)
        for cout, stride in cfg:
            layers += [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin), nn.ReLU6(), nn.Conv2d(cin, c(cout), 1), nn.ReLU6()]
            cin = c(cout)
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.body(x.reshape(-1, 3, 96, 96))), dim=-1)


MODELS = {"kws_dscnn": (DSCNN, 490, 12), "vww_mobilenet_v1_025": (MobileNetV1, 27648, 2),
          "ic_resnet8": (ResNet8, 3072, 10), "ad_autoencoder": (AutoEncoder, 640, 640)}


def run(name: str, rng: np.random.Generator) -> dict:
    make, n, outputs = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    mcu = load_tiers()["mcu"]
    t0 = time.perf_counter()
    with captured_output():
        art = convert(mcu, model, export_onnx(model, n), FeatureSpec(n_features=n, steps=[]),
                      rng.standard_normal((32, n)).astype(np.float32), name, 1, outputs)
    check_operators(mcu, art)
    tflite = art.files["model.tflite"]
    arena = tflm_arena_measured(tflite)
    row = {"tflite_bytes": len(tflite), "tflm_arena_bytes": arena["ram_bytes"],
           "tflm_reported_arena_bytes": arena["tflm_reported_arena_bytes"],
           "operators": sorted({op.name for op in art.operators}), "folded_layout_transposes": art.folded_transposes}
    vectors = rng.integers(-128, 128, (8, n), dtype=np.int16).astype(np.int8)
    try:
        proof = prove_on_cortex_m4(tflite, vectors, timeout_s=300)
    except AotRefused as e:
        row.update({"aot": "refused", "reason": str(e), "aot_bitexact": False, "qemu_ran": False})
    else:
        m = proof.measured
        row.update({"aot_ram_bytes": m["aot_ram_bytes"], "aot_arena_bytes": m["aot_arena_bytes"],
                    "aot_arena_bytes_no_inplace": m["aot_arena_bytes_no_inplace"], "aot_stack_bytes": m["aot_stack_bytes"],
                    "aot_flash_bytes": m["aot_flash_bytes"], "aot_ram_ratio": round(m["aot_ram_bytes"] / arena["ram_bytes"], 3),
                    "aot_flash_vs_tflite": round(m["aot_flash_bytes"] / len(tflite), 3),
                    "aot_instructions": m["aot_instructions"], "aot_bitexact": True, "qemu_ran": True,
                    "vectors": m["aot_vectors_checked"]})
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    rng = np.random.default_rng(0)
    models = {}
    for name in MODELS:
        models[name] = run(name, rng)
        print(f"{name}: {json.dumps(models[name])}", file=sys.stderr, flush=True)
    ratios = [r["aot_ram_ratio"] for r in models.values() if "aot_ram_ratio" in r]
    print(json.dumps({"models": models, "aot_ram_ratio_max": max(ratios) if ratios else None,
                      "aot_bitexact_all": all(r["aot_bitexact"] for r in models.values()),
                      "qemu_ran_all": all(r["qemu_ran"] for r in models.values()),
                      "goal_met": bool(ratios) and len(ratios) == len(models) and max(ratios) <= 0.6,
                      "machine": {"arch": platform.machine(), "python": platform.python_version(),
                                  "torch": torch.__version__}}))


if __name__ == "__main__":
    main()
