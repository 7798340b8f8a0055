"""The client side: the original client (`client.py`), the comparison (`experiment.py`) and its figures
(`plot.py`, `timeline_plot.py`), which run as scripts; and what they and the benchmarks (bench/) share: the
workload type (`workload.py`), the load generator (`load.py`), a real server in a child process
(`server_process.py`) and how a run ends on a signal (`interrupts.py`). Each request's timings are a
telemetry.latency.RequestRecord, as the server's are.
"""
