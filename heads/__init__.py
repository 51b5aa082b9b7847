"""Acceptance prediction head (SpecDec++ section 4): model, data generation, training, evaluation."""
