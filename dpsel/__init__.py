"""dpsel: Bayesian data-point selection for instruction tuning."""
__version__ = "0.1.0"
