"""Trustworthy outputs: calibration, per-image uncertainty (CARD), conformal prediction sets,
bootstrap intervals and lesion checks of the explanations. Pure maths on probabilities and
samples; imports nothing from training/inference."""
