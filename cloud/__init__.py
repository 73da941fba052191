"""The control plane, in layers, one subpackage each:

==============  ==========================================================================
``store``       the one owner of every table: schema, migrations, queries (``Store`` Protocol)
``train``       data sets, model definitions, training (DDP), run records
``package``     export, quantization, per-tier conversion and budgets, the mcu arena and AOT
``release``     the one release path: image repository, director, deltas, update records
``ingest``      the MQTT session and the status, telemetry and error ingest
``rollouts``    staged delivery: the state machines as tables, the controller, the health gate
``drift``       the stored baselines and per-cohort drift against them
``loop``        pipeline files and the closed loop (collect, train, gate, package, roll out)
``api``         the HTTP API
==============  ==========================================================================

Beside them: :mod:`edgeloop.cloud.services` (the one composition root of the service stack),
:mod:`edgeloop.cloud.workspace`, :mod:`edgeloop.cloud.registry` (the workspace's store), :mod:`edgeloop.cloud.models`,
:mod:`edgeloop.cloud.fleet_registry` and :mod:`edgeloop.cloud.errors`.

Cloud code may import :mod:`contracts`. Of the device side it imports only
:mod:`edgeloop.device_sdk.runtime` and :mod:`edgeloop.device_sdk.errors`, to measure and health-check packages with
the exact runtime classes devices run (tests/test_layout.py enforces this). Device code never
imports cloud code.
"""
