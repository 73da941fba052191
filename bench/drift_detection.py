"""Drift detection: delay per scenario and false alarms over a long run without drift.

The detector is the real one (``cloud.drift.DriftMonitor``: per window, the newest 1, 2, 4 and 8
windows merged, every feature's mean test and binned KS test and the prediction chi-square
together under Holm, alpha 0.1 split over the looks: ``MONITOR_CONFIG``). Windows are summarised by the device's
own code (``device_sdk.telemetry.FeatureSummary``) on the baseline the package carries
(``cloud.packaging.baseline_stats`` of the training split: 64 features, 10 bins), and
predictions come from a digits MLP trained here.

- False alarms: ``--null-windows`` windows of ``--window`` inputs drawn with replacement from
  the training split (the distribution the baseline describes), one monitor over the whole run;
  every window with an alarm counts. ``false_alarm_rate_heldout`` does the same on the held-out
  rows (validation + test, 539 rows: resampling a small set repeats its own sampling offset, so
  this is a harder, pessimistic figure).
- Each scenario: a fresh monitor sees ``WARMUP`` calm windows, then drifted ones until it alarms
  (at most ``MAX_WINDOWS``). Delay 1 = found on the first drifted window. Single-feature scenarios
  run once on every feature whose baseline is not concentrated in one value (most common value
  under 90% of rows: 48 of the 64 digits pixels; a pixel that is almost always 0 has no mean to
  shift by a fraction of its tiny sd); no feature is picked by hand.

Prints progress on stderr and one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud.datasets import load_dataset  # noqa: E402
from cloud.drift import MONITOR_CONFIG, DriftConfig, DriftMonitor  # noqa: E402
from cloud.packaging import baseline_stats  # noqa: E402
from cloud.training import TrainParams, train  # noqa: E402
from device_sdk.telemetry import FeatureSummary  # noqa: E402
from simulators.datastream import Drift, drifted_windows  # noqa: E402

WARMUP = 8
MAX_WINDOWS = 20


class Stream:
    def __init__(self, model: torch.nn.Module, features, baseline: dict, n_classes: int) -> None:  # noqa: ANN001
        self.model, self.features, self.baseline, self.n_classes = model, features, baseline, n_classes

    def window(self, x: np.ndarray) -> tuple[dict, list[int]]:
        """One telemetry window's feature summary and prediction counts, as a device makes them."""
        summary = FeatureSummary(self.baseline)
        summary.record_batch(x)
        with torch.no_grad():
            probs = self.model(torch.from_numpy(self.features.apply(x).astype(np.float32))).numpy()
        return summary.to_obj(), np.bincount(probs.argmax(1), minlength=self.n_classes).tolist()


def false_alarms(stream: Stream, x: np.ndarray, y: np.ndarray, windows: int, size: int, cfg: DriftConfig,
                 seed: int) -> float:
    monitor = DriftMonitor(stream.baseline, cfg)
    alarms = 0
    for batch, _ in drifted_windows(x, y, Drift(), windows, size, np.random.default_rng(seed)):
        alarms += monitor.add(*stream.window(batch)).drifted
    return alarms / windows


def delay(stream: Stream, x: np.ndarray, y: np.ndarray, drift: Drift, size: int, cfg: DriftConfig,
          rng: np.random.Generator) -> int | None:
    monitor = DriftMonitor(stream.baseline, cfg)
    for batch, _ in drifted_windows(x, y, Drift(), WARMUP, size, rng):
        if monitor.add(*stream.window(batch)).drifted:
            monitor.reset()          # a false alarm before the onset: handled, start over
    for w, (batch, _) in enumerate(drifted_windows(x, y, drift, MAX_WINDOWS, size, rng), start=1):
        if monitor.add(*stream.window(batch)).drifted:
            return w
    return None


def scenarios(baseline: dict, eligible: list[int], lo: float, hi: float) -> dict[str, list[Drift]]:
    feats = baseline["features"]
    out: dict[str, list[Drift]] = {}
    for amount in (0.25, 0.5, 1.0):
        out[f"mean_shift_{amount:g}"] = [Drift("mean_shift", f, amount) for f in eligible]
    out["scale_1.5"] = [Drift("scale", f, 1.5, lo=lo, hi=hi) for f in eligible]
    out["stuck_at_mean"] = [Drift("stuck", f, round(feats[f]["mean"])) for f in eligible]
    out["gain_1.1_all"] = [Drift("gain", 0, 1.1, lo=lo, hi=hi)] * 8
    out["label_shift_x3"] = [Drift("label_shift", 0, 3.0, classes=c) for c in
                             ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (0, 5), (1, 7), (3, 8))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=200, help="inputs per telemetry window")
    ap.add_argument("--null-windows", type=int, default=2000, help="windows in the run without drift")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(1)
    train_split, val, test = load_dataset().split()
    result = train(load_dataset(), TrainParams(epochs=20, checkpoint_every=0))
    model = result.model.eval()
    with torch.no_grad():
        probs = model(torch.from_numpy(result.features.apply(train_split.x).astype(np.float32))).numpy()
    baseline = baseline_stats(train_split.x, probs)
    stream = Stream(model, result.features, baseline, probs.shape[1])
    cfg = MONITOR_CONFIG
    rows = baseline["rows"]
    eligible = [i for i, f in enumerate(baseline["features"])
                if f["std"] > 0 and max(f["counts"]) / rows < cfg.mean_max_mode_share]
    lo, hi = float(train_split.x.min()), float(train_split.x.max())

    fa = false_alarms(stream, train_split.x, train_split.y, args.null_windows, args.window, cfg, args.seed)
    print(f"false alarms: {fa:.4f} of {args.null_windows} windows ({time.time() - t0:.0f} s)", file=sys.stderr)
    held_x, held_y = np.concatenate([val.x, test.x]), np.concatenate([val.y, test.y])
    fa_held = false_alarms(stream, held_x, held_y, args.null_windows, args.window, cfg, args.seed + 1)
    print(f"false alarms (held-out rows): {fa_held:.4f}", file=sys.stderr)

    rng = np.random.default_rng(args.seed + 2)
    delays: dict[str, float | None] = {}
    within2: dict[str, float] = {}
    missed: dict[str, int] = {}
    worst: dict[str, int | None] = {}
    for name, drifts in scenarios(baseline, eligible, lo, hi).items():
        found = [delay(stream, train_split.x, train_split.y, d, args.window, cfg, rng) for d in drifts]
        hits = [d for d in found if d is not None]
        delays[name] = round(statistics.mean(hits), 2) if hits else None
        within2[name] = round(sum(d <= 2 for d in hits) / len(found), 3)
        missed[name] = len(found) - len(hits)
        worst[name] = max(hits) if hits else None
        print(f"{name}: mean delay {delays[name]} windows, within 2: {within2[name]:.0%}, "
              f"missed {missed[name]}/{len(found)}", file=sys.stderr)
    print(json.dumps({
        "window": args.window, "features": len(baseline["features"]), "mean_tested_features": len(eligible),
        "alpha": cfg.alpha, "looks": list(cfg.looks),
        "null_windows": args.null_windows, "false_alarm_rate": fa, "false_alarm_rate_heldout": fa_held,
        "delay_windows": delays, "detected_within_2": within2, "max_delay_windows": worst, "missed": missed,
        "seconds": round(time.time() - t0, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()}}))


if __name__ == "__main__":
    main()
