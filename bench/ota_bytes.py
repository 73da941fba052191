"""Bytes on the wire for retrained models (full package vs delta), and time to update one device
over a throttled, dropping link with and without resume.

- Demo model: the digits MLP trained for 15 epochs, then its head (last layer) fine-tuned for
  3 epochs with everything else frozen: a real head-only retrain.
- MLPerf Tiny-shaped model: a DS-CNN keyword-spotting network (input 49x10, random weights),
  its final fully connected layer retrained (perturbed).
- Link: a real HTTP proxy (simulators.network.LinkProxy) at 256 kbit/s that drops the
  connection after 60% of a transfer, twice; the resumable fetcher continues with HTTP Range,
  the "restart" variant discards the partial bytes before each retry.

Prints one JSON object as its last line.
"""

from __future__ import annotations

import copy
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tuf.api import exceptions as tuf_exc  # noqa: E402

from edgeloop.contracts.features import FeatureSpec  # noqa: E402
from edgeloop.cloud.train.datasets import load_dataset  # noqa: E402
from edgeloop.cloud.release.delta import make_delta  # noqa: E402
from edgeloop.cloud.package.export import export_onnx  # noqa: E402
from edgeloop.cloud.package.packaging import build_package  # noqa: E402
from edgeloop.cloud.release.repo_server import RepositoryServer  # noqa: E402
from edgeloop.cloud.train.training import TrainParams, train  # noqa: E402
from edgeloop.device_sdk.fetcher import ResumableFetcher  # noqa: E402
from edgeloop.simulators.network import Fault, LinkProxy  # noqa: E402

LINK_BYTES_PER_S = 256_000 / 8
LABELS = [str(i) for i in range(10)]


def demo_head_retrain() -> tuple[bytes, bytes]:
    ds = load_dataset()
    train_split, _, test = ds.split()
    base = train(ds, TrainParams(epochs=15))
    tuned = copy.deepcopy(base.model)
    head = tuned.inner.net[-1]
    for p in tuned.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(head.parameters(), lr=0.005)
    x = torch.from_numpy(base.features.apply(train_split.x))
    y = torch.from_numpy(train_split.y)
    for _ in range(3):
        for i in range(0, len(y), 64):
            loss = nn.functional.cross_entropy(tuned.inner(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    pkgs = [build_package("digits-mlp", v, "edge-gateway", export_onnx(m, 64), base.features, LABELS,
                          test.x[:16], {"run_id": f"bench-{v}"}) for v, m in ((1, base.model), (2, tuned))]
    return pkgs[0].data, pkgs[1].data


class DSCNN(nn.Module):
    """MLPerf Tiny keyword spotting DS-CNN (49x10 MFCC input, 64 channels, 12 classes)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, 64, (10, 4), stride=(2, 2), padding=(5, 1)), nn.ReLU()]
        for _ in range(4):
            layers += [nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.body(x.reshape(-1, 1, 49, 10))), dim=-1)


def mlperf_head_retrain() -> tuple[bytes, bytes]:
    torch.manual_seed(0)
    model = DSCNN().eval()
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.head.weight.add_(0.01 * torch.randn_like(tuned.head.weight))
        tuned.head.bias.add_(0.01)
    features = FeatureSpec(n_features=490, steps=[])
    inputs = np.random.default_rng(0).standard_normal((8, 490)).astype(np.float32)
    pkgs = [build_package("kws-dscnn", v, "edge-gateway", export_onnx(m, 490), features,
                          [str(i) for i in range(12)], inputs, {"run_id": f"bench-{v}"})
            for v, m in ((1, model), (2, tuned))]
    return pkgs[0].data, pkgs[1].data


def timed_download(url: str, proxy: LinkProxy, partial_dir: Path, resume: bool, size: int) -> tuple[float, int]:
    proxy.faults[:] = [Fault(drop_after=int(size * 0.6)), Fault(drop_after=int(size * 0.6))]
    start_log = len(proxy.log)
    fetcher = ResumableFetcher(partial_dir, read_timeout=10)
    start = time.perf_counter()
    for _ in range(10):
        if not resume:
            shutil.rmtree(partial_dir, ignore_errors=True)
        try:
            data = b"".join(fetcher.fetch(url))
            break
        except tuf_exc.DownloadError:
            continue
    else:
        raise RuntimeError("download never completed")
    assert len(data) == size
    return time.perf_counter() - start, sum(r.sent for r in proxy.log[start_log:])


def link_times(package: bytes) -> dict:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "repository" / "targets").mkdir(parents=True)
        (root / "repository" / "targets" / "pkg.elpkg").write_bytes(package)
        server = RepositoryServer(root / "repository", director_dir=root / "director").start()
        proxy = LinkProxy(server.url.rsplit("/", 1)[0], bytes_per_s=LINK_BYTES_PER_S).start()
        url = f"{proxy.url}/repository/targets/pkg.elpkg"
        try:
            resume_s, resume_bytes = timed_download(url, proxy, root / "p1", True, len(package))
            restart_s, restart_bytes = timed_download(url, proxy, root / "p2", False, len(package))
        finally:
            proxy.stop()
            server.stop()
    return {"resume_seconds": round(resume_s, 2), "restart_seconds": round(restart_s, 2),
            "resume_wire_bytes": resume_bytes, "restart_wire_bytes": restart_bytes}


def main() -> None:
    d1, d2 = demo_head_retrain()
    demo = make_delta(d1, d2)
    m1, m2 = mlperf_head_retrain()
    kws = make_delta(m1, m2)
    assert demo is not None and kws is not None
    link = link_times(m2)
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "full_bytes": len(d2), "delta_bytes": demo[1].delta_bytes, "delta_ratio": round(demo[1].ratio, 4),
        "mlperf_kws_full_bytes": len(m2), "mlperf_kws_delta_bytes": kws[1].delta_bytes,
        "mlperf_kws_delta_ratio": round(kws[1].ratio, 4),
        "link_kbit_s": 256, "link_drops": 2, "link_package_bytes": len(m2), **link,
    }
    print(f"demo head-only retrain: {out['delta_bytes']} of {out['full_bytes']} bytes ({out['delta_ratio']:.3f}); "
          f"DS-CNN: {out['mlperf_kws_delta_bytes']} of {out['mlperf_kws_full_bytes']} "
          f"({out['mlperf_kws_delta_ratio']:.3f}); link: resume {link['resume_seconds']} s vs restart "
          f"{link['restart_seconds']} s", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
