"""The versioned `starquant_config` block of `config.json` (docs/checkpoint-format.md)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..models.family import SITE_NAMES, family_of
from ..quantization.tac import uniform_bucket_edges

__all__ = ["FORMAT_VERSION", "SGATSettings", "TACSettings", "StarQuantConfig", "describe_validation_error"]

FORMAT_VERSION = 3  # 2: tac.bucket_edges; 3: sgat.online_smoothing (formats 1 and 2 are still read)


def describe_validation_error(error: ValidationError) -> str:
    """`field.path: message` of the first problem pydantic found."""
    first = error.errors()[0]
    # Drop pydantic's validator wrappers from the path (`function-after[validate(), Model]`).
    path = [str(p) for p in first["loc"] if not str(p).startswith(("function-", "function_"))]
    return f"{'.'.join(path)}: {first['msg']}"


class SGATSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rotation_block_size: int = Field(ge=0)
    smoothing_strength: float = Field(ge=0, le=1)
    centre: Literal["mean", "midrange"] = "mean"
    per_state_shift: bool = True
    per_state_clip: bool = True
    activation_bits: int = Field(ge=2, le=16)
    weight_bits: int = Field(ge=2, le=16)
    weight_group_size: int | None = None
    # Sites (`models.family.SITE_NAMES`) whose smoothing D is stored (`sgat_smoothing`) and applied
    # online because nothing upstream could absorb it; formats 1-2 lack it (readers then derive it
    # from the model family's rule, `ModelFamily.online_smoothing_sites`).
    online_smoothing: list[str] | None = None

    @field_validator("online_smoothing")
    @classmethod
    def _known_sites(cls, value: list[str] | None) -> list[str] | None:
        unknown = [site for site in value or [] if site not in SITE_NAMES]
        if unknown:
            raise ValueError(f"unknown SGAT site(s) {unknown}; sites are {list(SITE_NAMES)}")
        return value

    def online_sites(self, config) -> list[str]:
        """The sites applying D online: as recorded, or (formats 1-2) by the family's rule."""
        if self.online_smoothing is not None:
            return list(self.online_smoothing)
        return family_of(config).online_smoothing_sites(config)


class TACSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(gt=0)
    num_buckets: int = Field(ge=1)
    ridge: float = Field(ge=0)
    # Mask-ratio edges between the K buckets (K - 1 of them, ascending in [0, 1]); format 1
    # checkpoints have none and use equal-width buckets k/K.
    bucket_edges: list[float] | None = None

    @model_validator(mode="after")
    def _edges_fit_buckets(self) -> "TACSettings":
        edges = self.bucket_edges
        if edges is None:
            return self
        if len(edges) != self.num_buckets - 1:
            raise ValueError(f"bucket_edges has {len(edges)} edges; num_buckets={self.num_buckets} needs {self.num_buckets - 1}")
        if any(not 0 <= e <= 1 for e in edges) or any(a > b for a, b in zip(edges, edges[1:])):
            raise ValueError(f"bucket_edges must be ascending mask ratios in [0, 1], got {edges}")
        return self

    @property
    def edges(self) -> list[float]:
        return uniform_bucket_edges(self.num_buckets) if self.bucket_edges is None else self.bucket_edges


class StarQuantConfig(BaseModel):
    """What a reader needs besides compressed-tensors' `quantization_config`."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    mask_token_id: int
    sgat: SGATSettings | None = None
    tac: TACSettings | None = None

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value > FORMAT_VERSION:
            raise ValueError(
                f"format_version {value} is newer than this starquant-plugin reads ({FORMAT_VERSION}); upgrade it"
            )
        if value < 1:
            raise ValueError(f"format_version must be >= 1, got {value}")
        return value
