"""Load tests: locust scenarios (`locustfile.py`), the headless runner (`run.py`) and the
inventory invariants checked in every shard primary afterwards (`invariants.py`).

Nothing here is imported by the platform or by the test session: importing locust
monkeypatches the whole process with gevent, so the runner always runs in a process
of its own (`python -m loadtest.run`).
"""
