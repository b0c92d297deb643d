"""Graph passes: plan where quantizers go (weights.py, activations.py), apply the plan (apply.py),
remove quantizers again (strip.py), describe a QAT model (inspect.py). Entry points in insert.py."""
