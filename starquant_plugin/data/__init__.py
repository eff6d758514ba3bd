"""Calibration data for diffusion LLMs (pure torch + tokenizer)."""

from .calibration import CalibrationRecord, CalibrationTruncatedWarning, load_calibration_records, masked_calibration_samples
from .trajectories import rows_per_batch, trajectory_canvases

__all__ = ["CalibrationRecord", "CalibrationTruncatedWarning", "load_calibration_records", "masked_calibration_samples", "rows_per_batch",
           "trajectory_canvases"]
