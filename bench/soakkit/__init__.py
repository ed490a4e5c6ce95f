"""The parts of ``bench/soak.py``, the soak harness of the real ``layerwatch run`` process.

One module per noun: ``harness`` (the run: set-up, schedule, checkpoints, clean-up),
``loadgen`` (the C load generator's process), ``rig`` (tmpfs, overlay mounts, the config),
``brokers`` (nats-server, redis-server, Tansu), ``receiver`` (the webhook receiver),
``service`` (the service process and its API), ``outputs`` (reading back what each sink
wrote), ``consumer`` (replaying one sink's events), ``lists`` (change lists compared),
``invariants`` (the ledger of checks), ``faults`` (what breaks, and its undoing),
``schedule`` (the profiles), ``faultsink`` (a sink plugin that raises on command, loaded by
the service) and ``report`` (the final table).

The package is called ``soakkit``, not ``soak``: next to ``bench/soak.py`` a package ``soak``
would shadow the script for imports, and mypy would check only one of the two.
"""
