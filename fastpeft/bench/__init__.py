"""The benchmark harness behind ``fastpeft-bench`` (see ``python -m fastpeft.bench -h``)."""
