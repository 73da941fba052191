"""Mergeable feature summaries and drift/skew detection against the package baseline."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from edgeloop.contracts.package import read_package
from edgeloop.contracts.errors import SchemaError
from edgeloop.contracts.messages import as_dict, encode, parse
from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.drift.monitor import compare, drift_report, js, ks, merge, psi
from edgeloop.cloud.loop.pipeline import package_model, train_model
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.train.training import TrainParams
from edgeloop.cloud.workspace import Workspace
from edgeloop.device_sdk.telemetry import TelemetryWindow


def test_distances_are_zero_on_equal_and_large_on_different_histograms():
    a = np.array([100, 200, 300, 400], dtype=float)
    assert psi(a, a) == pytest.approx(0) and js(a, a) == pytest.approx(0) and ks(a, a)[0] == 0
    b = np.array([400, 300, 200, 100], dtype=float)
    assert psi(a, b) > 0.5 and 0 < js(a, b) <= 1 and ks(a, b)[1] < 1e-6


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    ws = Workspace.init(tmp_path_factory.mktemp("drift") / "ws")
    registry = Registry(ws.registry_path)
    mv = train_model(ws, registry, TrainParams(epochs=5))["model_version"]
    pkg = package_model(ws, registry, mv, "edge-gateway")
    _, _, test = load_dataset().split()
    return ws, registry, mv, read_package(pkg.data).manifest.baseline, test


def windows(baseline, x, mv, device, seqs, size=200, transform=lambda v: v, y=None):
    """Telemetry windows for ``x``; predictions are the true labels when given (a good model)."""
    y = load_dataset().split()[2].y if y is None else y
    out = []
    for w, seq in enumerate(seqs):
        win = TelemetryWindow(10, baseline)
        start = (w * size) % len(x)
        for row, label in zip(x[start:start + size], y[start:start + size]):
            win.record(int(label), 0.9, 0.1, int(label), transform(row.copy()))
        out.append(parse(encode(win.close(device, seq, mv))))     # through the wire format
    return out


def test_summaries_merge_exactly_by_addition(fleet):
    _, _, mv, baseline, test = fleet
    a = windows(baseline, test.x[:100], mv, "d", [0], 100)[0]
    b = windows(baseline, test.x[100:200], mv, "d", [1], 100, y=test.y[100:200])[0]
    both = windows(baseline, test.x[:200], mv, "d", [2], 200)[0]
    merged = merge([a.features, b.features])
    assert [list(h) for h in merged["hist"]] == both.features["hist"]
    assert list(merged["n"]) == both.features["n"] and np.allclose(merged["sum"], both.features["sum"])


def test_held_out_data_raises_no_alarm_and_a_shifted_sensor_does(fleet):
    _, _, mv, baseline, test = fleet
    calm = windows(baseline, test.x, mv, "d", range(1), 359)
    verdict = compare(baseline, merge([w.features for w in calm]), None)
    assert not verdict.drifted, verdict.drifted_features
    def gain(v):           # a sensor whose gain drifted: every pixel 60% brighter, saturating at 16
        return np.minimum(v * 1.6, 16)
    shifted = windows(baseline, test.x, mv, "d", range(1), 200, gain)
    verdict = compare(baseline, merge([w.features for w in shifted]), None)
    assert verdict.drifted and len(verdict.drifted_features) >= 5


def test_report_tells_skew_from_drift_and_stores_alerts(fleet):
    ws, registry, mv, baseline, test = fleet
    def stuck(v):          # one stuck sensor: feature 20 always reads 16
        v[20] = 16
        return v
    records = (windows(baseline, test.x, mv, "calm", range(3), 100)
               + windows(baseline, test.x, mv, "skewed", range(3), 100, stuck)
               + windows(baseline, test.x, mv, "drifting", range(3), 100)
               + windows(baseline, test.x, mv, "drifting", range(3, 9), 100, stuck))
    for device in ("calm", "skewed", "drifting"):
        registry.record_status({"device_id": device, "tier": "edge-gateway", "state": "committed",
                                "model_version": mv, "update_id": None, "reason": None})
    rows = [as_dict(r) for r in records]
    for r in rows:
        r.pop("extra")
    assert registry.add_telemetry(rows) == len(rows)
    report = {r["key"]: r for r in drift_report(registry, by="device")}
    assert report["calm"]["status"] == "ok"
    assert report["skewed"]["status"] == "skew" and 20 in report["skewed"]["drifted_features"]
    assert report["drifting"]["status"] == "drift" and 20 in report["drifting"]["drifted_features"]
    assert {(a["kind"], a["key"]) for a in registry.alerts()} >= {("skew", "skewed"), ("drift", "drifting")}


def test_feature_summaries_that_do_not_add_up_are_refused(fleet):
    _, _, mv, baseline, test = fleet
    record = windows(baseline, test.x[:50], mv, "d", [0], 50)[0]
    body = json.loads(encode(record))
    body["features"]["hist"][3][0] += 1                    # one more count than inputs
    with pytest.raises(SchemaError, match="do not add up"):
        parse(json.dumps(body))
    body = json.loads(encode(record))
    body["features"]["sum"] = body["features"]["sum"][:-1]   # wrong length
    with pytest.raises(SchemaError, match="features.sum"):
        parse(json.dumps(body))


# -- the streaming detector and its targets (bench/drift_detection.py measures them at length) -------
from edgeloop.cloud.drift.monitor import DriftConfig, DriftMonitor, holm  # noqa: E402
from edgeloop.cloud.ingest.checks import TelemetryGate  # noqa: E402
from edgeloop.device_sdk.telemetry import FeatureSummary  # noqa: E402
from edgeloop.simulators.datastream import Drift, drifted_windows  # noqa: E402


def _summaries(baseline, x, y, drift, windows, rng, size=200):
    out = []
    for batch, labels in drifted_windows(x, y, drift, windows, size, rng):
        s = FeatureSummary(baseline)
        s.record_batch(batch)
        out.append((s.to_obj(), np.bincount(labels, minlength=10).tolist()))
    return out


def test_holm_rejects_step_down_and_stops_at_the_first_failure():
    assert holm([0.001, 0.04, 0.03, 0.5], 0.05) == [True, False, False, False]
    assert holm([0.001, 0.02, 0.012, 0.5], 0.05) == [True, True, True, False]


def test_a_quarter_sd_shift_on_one_feature_is_found_by_the_mean_test_where_histograms_miss_it(fleet):
    """All 64 features tested together, two windows of 200 inputs, a 0.25 sd shift on one feature,
    once for every mean-tested feature: the mean tests (the feature's own, and its residual given
    the others) find most of them, the binned KS alone (with
    its PSI floor) few; and 30 calm windows of the streaming monitor raise at most one alarm."""
    _, _, _, baseline, _ = fleet
    train_split = load_dataset().split()[0]
    rows = baseline["rows"]
    eligible = [i for i, f in enumerate(baseline["features"])
                if f["std"] > 0 and max(f["counts"]) / rows < DriftConfig().mean_max_mode_share]
    assert len(eligible) >= 40
    per_look = DriftConfig(alpha=0.025)                           # one look's alpha, plain Holm
    ks_only = DriftConfig(alpha=0.025, mean_max_mode_share=0.0)    # no feature mean-tested
    found = {"mean": 0, "ks": 0}
    for seed, feature in enumerate(eligible):
        two = _summaries(baseline, train_split.x, train_split.y, Drift("mean_shift", feature, 0.25), 2,
                         np.random.default_rng(seed))
        merged = merge([w[0] for w in two])
        verdict = compare(baseline, merged, None, per_look)
        found["mean"] += feature in verdict.drifted_features and bool({"mean", "resid"} & set(verdict.features[feature].tests))
        found["ks"] += compare(baseline, merged, None, ks_only).drifted
    assert found["mean"] >= 0.6 * len(eligible) and found["mean"] >= found["ks"] + 10, found
    calm = _summaries(baseline, train_split.x, train_split.y, Drift(), 30, np.random.default_rng(7))
    monitor = DriftMonitor(baseline)
    # inputs only (labels are not the model's predictions); the monitor alarms on under 1% of calm
    # windows (bench/drift_detection.py), so one alarm in 30 is tolerated, a careless test's many are not
    assert sum(monitor.add(w[0], None).drifted for w in calm) <= 1


def test_stuck_sensor_and_label_shift_are_found_in_one_window(fleet):
    _, _, _, baseline, _ = fleet
    train_split = load_dataset().split()[0]
    rng = np.random.default_rng(3)
    stuck = _summaries(baseline, train_split.x, train_split.y, Drift("stuck", 20, 6.0), 1, rng)[0]
    verdict = DriftMonitor(baseline).add(*stuck)
    assert verdict.drifted and 20 in verdict.drifted_features and "ks" in verdict.features[20].tests
    shift = _summaries(baseline, train_split.x, train_split.y, Drift("label_shift", 0, 4.0, classes=(0, 1)), 1, rng)[0]
    verdict = DriftMonitor(baseline).add(None, shift[1])        # predictions only
    assert verdict.drifted is False and verdict.note                # no inputs: no verdict
    verdict = DriftMonitor(baseline).add(*shift)
    assert verdict.drifted and verdict.predictions is not None and verdict.predictions.drifted


def test_record_batch_counts_exactly_like_one_record_at_a_time(fleet):
    _, _, _, baseline, test = fleet
    x = test.x[:120].copy()
    x[3, 5], x[7, 0], x[8, 1] = np.nan, -5.0, 99.0             # missing, under and over the range
    one, many = FeatureSummary(baseline), FeatureSummary(baseline)
    for row in x:
        one.record(row)
    many.record_batch(x[:50])
    many.record_batch(x[50:])
    a, b = one.to_obj(), many.to_obj()
    for key in ("rsum", "rsumsq"):        # residuals are not integers: sums in another order round apart
        assert np.allclose(a.pop(key), b.pop(key), rtol=1e-12, atol=1e-9)
    assert a == b


def test_a_summary_counted_on_other_bin_edges_is_refused_at_ingest(fleet):
    """Same shape, other edges (a device running another package's baseline): the digest differs."""
    _, registry, mv, baseline, test = fleet
    good = windows(baseline, test.x[:60], mv, "edges-dev", [0], 60)[0]
    other = json.loads(json.dumps(baseline))
    for f in other["features"]:
        f["edges"] = [v * 1.5 for v in f["edges"]]
    bad = windows(other, test.x[:60], mv, "edges-dev", [1], 60)[0]
    reshaped = json.loads(encode(good))
    reshaped["seq"] = 2
    reshaped["features"]["hist"][0] = reshaped["features"]["hist"][0][:5]
    reshaped["features"]["hist"][0][0] += 60 - sum(reshaped["features"]["hist"][0])
    reshaped["features"].pop("edges")
    kept, refused = TelemetryGate(registry).check([good, bad, parse(json.dumps(reshaped))])
    assert kept == [good]
    assert [(r.seq, r.reason) for r in refused] == [(1, "baseline-mismatch"), (2, "baseline-mismatch")]


def test_operator_labels_become_live_accuracy_per_site_cohort(fleet, tmp_path, capsys):
    from edgeloop.cloud.fleet_registry import EnrolledDevice, FleetRegistry
    from edgeloop.fleet.cli import main

    ws, registry, mv, baseline, test = fleet
    fleet_registry = FleetRegistry(registry)
    for name, site in (("lab-berlin", "berlin"), ("lab-oslo", "oslo")):
        fleet_registry.enroll(EnrolledDevice(name, f"s-{name}", "e" * 64, time.time() + 3600, tier="edge-gateway",
                                             tags={"site": site}))
    rows = [as_dict(r) for r in windows(baseline, test.x, mv, "lab-berlin", range(2), 100)
            + windows(baseline, test.x, mv, "lab-oslo", range(2), 100)]
    for r in rows:
        r.pop("extra")
        r["labelled"] = r["correct"] = 0                  # the devices never learn ground truth
    registry.add_telemetry(rows)
    before = {r["key"]: r for r in drift_report(registry, by="site", store_alerts=False)}
    assert before["berlin"]["accuracy"] is None and before["oslo"]["accuracy"] is None
    feedback = tmp_path / "labels.csv"
    feedback.write_text("device_id,seq,labelled,correct\nlab-berlin,0,100,90\nlab-berlin,1,100,70\n"
                        "lab-oslo,0,50,50\nlab-oslo,7,10,0\n")
    assert main(["labels", "add", str(feedback), "--workspace", str(ws.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == \
        {"rows": 4, "windows_known": 3, "windows_unknown": 1}
    after = {r["key"]: r for r in drift_report(registry, by="site", store_alerts=False)}
    assert after["berlin"]["accuracy"] == pytest.approx(0.8) and after["oslo"]["accuracy"] == 1.0
    assert after["berlin"]["records"] == 2 and after["berlin"]["status"] == "ok"
    bad = tmp_path / "bad.csv"
    bad.write_text("device_id,seq,labelled,correct\nlab-oslo,1,5,9\n")
    assert main(["labels", "add", str(bad), "--workspace", str(ws.root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.csv:2" in err


def _entry(registry, device_id: str) -> dict:   # noqa: ANN001
    return next(r for r in drift_report(registry, by="device", store_alerts=False) if r["key"] == device_id)


def test_regression_label_feedback_gives_live_mae_once_even_when_sent_twice(fleet, tmp_path, capsys):
    """A regression fleet's delayed ground truth carries the error (mae), not just counts; the
    same file added twice changes nothing; a window without mae keeps the device's own error rate."""
    from edgeloop.fleet.cli import main

    ws, registry, mv, baseline, test = fleet
    rows = [as_dict(r) for r in windows(baseline, test.x, mv, "reg-dev", range(3), 50)]
    for r in rows:
        r.pop("extra")
        r["labelled"], r["correct"], r["abs_err_sum"] = 10, 5, 20.0     # the device's own: MAE 2.0
    registry.add_telemetry(rows)
    assert _entry(registry, "reg-dev")["mae"] == pytest.approx(2.0)
    feedback = tmp_path / "labels.csv"
    feedback.write_text("device_id,seq,labelled,correct,mae\nreg-dev,0,40,30,1.0\nreg-dev,1,40,20,3.0\n"
                        "reg-dev,2,20,10,\n")
    for _ in range(2):
        assert main(["labels", "add", str(feedback), "--workspace", str(ws.root), "--json"]) == 0
        capsys.readouterr()
        entry = _entry(registry, "reg-dev")
        # (40*1.0 + 40*3.0 + 20 * the device's 2.0) / 100 labelled
        assert entry["labelled"] == 100 and entry["mae"] == pytest.approx(2.0)
        assert entry["accuracy"] == pytest.approx(0.6)
    bad = tmp_path / "bad.csv"
    bad.write_text("device_id,seq,labelled,correct,mae\nreg-dev,0,5,5,-1\n")
    assert main(["labels", "add", str(bad), "--workspace", str(ws.root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.csv:2" in err and "mae" in err
    assert _entry(registry, "reg-dev")["mae"] == pytest.approx(2.0)   # nothing stored


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_drift_on_large_images_is_detected_per_channel(layout):
    """A 3x16x16 camera (768 values, over the per-value limit): the baseline and the devices
    summarise the mean of each channel, so calm frames raise no alarm and a red-channel gain
    drift is found, in channel 0's distribution, through the wire format."""
    from edgeloop.cloud.package.packaging import baseline_stats
    from edgeloop.contracts.features import FeatureSpec

    rng = np.random.default_rng(7)
    shape = (3, 16, 16) if layout == "NCHW" else (16, 16, 3)

    def frames(n: int, red_gain: float = 1.0) -> np.ndarray:
        level = rng.uniform(60, 160, size=(n, 1, 1, 1))                  # scene brightness
        tint = np.array([1.0, 0.8, 0.6]).reshape(1, 3, 1, 1)
        chw = level * tint + rng.normal(0, 12, size=(n, 3, 16, 16))
        chw[:, 0] *= red_gain
        imgs = chw if layout == "NCHW" else chw.transpose(0, 2, 3, 1)
        return np.clip(imgs, 0, 255).reshape(n, -1).astype(np.float32)

    spec = FeatureSpec(n_features=768, input_shape=shape, layout=layout)
    train = frames(2000)
    probs = np.tile([0.5, 0.5], (2000, 1))
    baseline = baseline_stats(train, probs, features=spec)
    assert baseline["reduce"]["op"] == "channel_mean" and len(baseline["features"]) == 3

    def window(x: np.ndarray, seq: int):
        win = TelemetryWindow(2, baseline)
        for row in x:
            win.record(0, 0.5, 0.1, None, row)
        return parse(encode(win.close("cam", seq, "cam:1")))

    calm = [window(frames(200), i) for i in range(3)]
    assert all(len(w.features["hist"]) == 3 for w in calm)               # per channel on the wire
    assert not compare(baseline, merge([w.features for w in calm]), None).drifted
    drifted = [window(frames(200, red_gain=1.25), 10 + i) for i in range(3)]
    verdict = compare(baseline, merge([w.features for w in drifted]), None)
    assert verdict.drifted and 0 in verdict.drifted_features
    # the marginal shift is channel 0's alone (the others can be flagged by the residual test,
    # since their relation to channel 0 changed)
    by_psi = sorted(verdict.features, key=lambda f: -f.psi)
    assert by_psi[0].feature == 0 and by_psi[0].psi > 0.5 > max(f.psi for f in by_psi[1:])


# -- weighted Holm and the monitor's alpha split (cloud/drift/monitor.py: DriftConfig.mean_weight, look_weights) --
from edgeloop.cloud.drift.monitor import MONITOR_CONFIG  # noqa: E402
from edgeloop.cloud.package.packaging import baseline_stats  # noqa: E402


def test_weighted_holm_keeps_the_family_wise_rate_and_favours_the_heavy_tests():
    rng = np.random.default_rng(11)
    weights = [8.0] * 48 + [1.0] * 65                # the monitor's mean tests and KS/chi-square
    alpha, families = 0.05, 4000
    p = rng.random((families, len(weights)))         # every hypothesis true, independent p-values
    wrong = sum(any(holm(list(row), alpha, weights)) for row in p)
    assert wrong / families <= alpha + 3 * (alpha * (1 - alpha) / families) ** 0.5, wrong / families
    assert wrong / families >= 0.6 * alpha           # and not a vacuous bound
    for row in p[:200]:                              # equal weights: plain Holm
        assert holm(list(row), alpha, [2.0] * len(weights)) == holm(list(row), alpha)
    heavy_p = alpha * 8 / sum(weights) * 0.99        # passes as a mean test, fails as a KS test
    assert holm([heavy_p, 0.5], alpha, [8.0, 1.0])[0] and not holm([heavy_p] + [0.5] * 112, alpha)[0]
    assert holm([1e-9, 0.5], alpha, [0.0, 1.0]) == [False, False]     # weight 0: never rejected
    with pytest.raises(ValueError):
        holm([0.1, 0.2], alpha, [1.0])
    assert sum(MONITOR_CONFIG.look_alphas()) == pytest.approx(MONITOR_CONFIG.alpha)
    assert DriftConfig(alpha=0.1).look_alphas() == pytest.approx((0.025,) * 4)    # default: equal split


def _synthetic(rows, rng, features=48):
    x = rng.normal(5.0, 2.0, (rows, features))
    return x, baseline_stats(x, np.eye(10)[rng.integers(0, 10, rows)])


def _window(baseline, x):
    s = FeatureSummary(baseline)
    s.record_batch(x)
    return s.to_obj()


def test_a_quarter_sd_shift_in_two_windows_is_found_more_often_with_the_weighted_alpha():
    """A synthetic 48-feature baseline of 1,258 rows; fresh windows of 200 from the same population
    (so the baseline's own sampling error is there). A 0.25 sd shift on one feature, two windows:
    the monitor's weighted split finds it far more often than an equal split of the same alpha,
    and 300 calm windows raise about the monitor's alpha in alarms, not more."""
    rng = np.random.default_rng(5)
    _, baseline = _synthetic(1258, rng)
    equal = DriftConfig(alpha=MONITOR_CONFIG.alpha)          # plain Holm, alpha split equally over 4 looks
    found = {"weighted": 0, "equal": 0}
    runs = 96
    for run in range(runs):
        feature = run % 48
        wins = []
        for _ in range(2):
            x = rng.normal(5.0, 2.0, (200, 48))
            x[:, feature] += 0.25 * 2.0
            wins.append(_window(baseline, x))
        for name, cfg in (("weighted", MONITOR_CONFIG), ("equal", equal)):
            monitor = DriftMonitor(baseline, cfg)
            found[name] += any(monitor.add(w, None).drifted for w in wins)
    assert found["weighted"] >= 0.6 * runs and found["weighted"] >= found["equal"] + 8, found
    monitor = DriftMonitor(baseline)
    alarms = sum(monitor.add(_window(baseline, rng.normal(5.0, 2.0, (200, 48))), None).drifted for _ in range(300))
    assert alarms <= 6, alarms


def _correlated(rows, rng, features=48):
    """Features that share a common part (like neighbouring pixels): each one's residual given
    the others spreads about half as much as the feature itself."""
    common = rng.normal(0.0, 1.0, (rows, 1))
    return 5.0 + 2.0 * (0.85 * common + np.sqrt(1 - 0.85 ** 2) * rng.normal(0.0, 1.0, (rows, features)))


def test_residual_tests_find_a_quarter_sd_shift_in_one_window_that_the_mean_test_cannot():
    """On correlated features a 0.25 sd shift of one feature is found in ONE window of 200 by the
    test of its residual given the others (the shift moves the residual by all of it, while the
    residual's spread is what the others cannot explain), which the feature's own mean test rarely
    manages; and calm windows stay calm."""
    rng = np.random.default_rng(11)
    x = _correlated(1258, rng)
    baseline = baseline_stats(x, np.eye(10)[rng.integers(0, 10, len(x))])
    res = baseline["residuals"]
    assert np.median(np.array(res["std"]) / np.array([f["std"] for f in baseline["features"]])) < 0.6
    found = {"resid": 0, "mean_only": 0}
    no_residuals = {k: v for k, v in baseline.items() if k != "residuals"}
    runs = 48
    for feature in range(runs):
        w = _correlated(200, rng)
        w[:, feature] += 0.25 * 2.0
        verdict = compare(baseline, merge([_window(baseline, w)]), None, DriftConfig(alpha=0.005, resid_weight=8))
        found["resid"] += feature in verdict.drifted_features and "resid" in verdict.features[feature].tests
        found["mean_only"] += compare(no_residuals, merge([_window(no_residuals, w)]), None,
                                      DriftConfig(alpha=0.005)).drifted
    assert found["resid"] >= 0.85 * runs and found["resid"] >= found["mean_only"] + 20, found
    monitor = DriftMonitor(baseline)
    alarms = sum(monitor.add(_window(baseline, _correlated(200, rng)), None).drifted for _ in range(200))
    assert alarms <= 4, alarms


def test_residual_sums_merge_exactly_and_a_bad_one_is_refused(fleet):
    _, _, _, baseline, test = fleet
    assert "residuals" in baseline
    one, two, both = FeatureSummary(baseline), FeatureSummary(baseline), FeatureSummary(baseline)
    x = test.x[:80].copy()
    x[5, 3] = np.nan                                             # an incomplete row has no residuals
    one.record_batch(x[:30])
    for row in x[30:]:
        two.record(row)
    both.record_batch(x)
    merged = merge([one.to_obj(), two.to_obj()])
    assert merged["rn"] == both.rn == 79
    assert np.allclose(merged["rsum"], both.rsum) and np.allclose(merged["rsumsq"], both.rsumsq)
    window = TelemetryWindow(10, baseline)
    for row in x[:20]:
        window.record(1, 0.9, 1.0, None, row)
    sent = window.close("dev-1", 0, "m:1")
    assert parse(encode(sent)) == sent                           # valid as a device sends it
    record = as_dict(sent)
    assert record["features"]["rn"] == 19 and len(record["features"]["rsum"]) == len(baseline["features"])
    for bad in ({"rn": 10**6}, {"rsum": [0.0]}, {"rsumsq": ["x"] * len(baseline["features"])}):
        obj = {**record, "schema": "edgeloop.telemetry/1", "features": {**record["features"], **bad}}
        with pytest.raises(SchemaError):
            parse(json.dumps(obj))
