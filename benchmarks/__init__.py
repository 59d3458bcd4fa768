"""batchexec's benchmark harness: ``make bench`` or ``python -m benchmarks [SCENARIO ...]``.

Benchmarks print figures; they are not tests and pytest does not collect them.
See BENCHMARKS.md for what each scenario measures and the latest figures.
"""
