"""Calibration data for diffusion LLMs (pure torch + tokenizer)."""

from .calibration import CalibrationRecord, CalibrationTruncatedWarning, load_calibration_records, masked_calibration_samples
from .trajectories import trajectory_canvases

__all__ = ["CalibrationRecord", "CalibrationTruncatedWarning", "load_calibration_records", "masked_calibration_samples", "trajectory_canvases"]
