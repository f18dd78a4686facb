"""Evaluation: metrics equal to the official scorers (`metrics`) and the paper's analysis of trained
adapters (`analysis`). Installed with `pip install lorakit[eval]`; the core does not import it."""
