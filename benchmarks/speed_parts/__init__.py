"""The parts of ``benchmarks/speed.py``: what they share, generation, training, scale, and the
report."""
