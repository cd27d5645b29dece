"""The field baseline in the artifact contract: the training data's field statistics, which a device compares what
it serves with for drift (how they are measured and compared: :mod:`edgeloop_core.drift`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FeatureBaseline(BaseModel):
    """One feature's bins and its share of training samples per bin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    edges: list[float] | None = Field(
        default=None, description="inner bin edges, ascending (bins: below the first, between, above the last); "
                                  "none: categorical, one bin per value 0..len(proportions)-1")
    proportions: list[float] = Field(description="share of training samples per bin; sums to 1")


class FieldBaseline(BaseModel):
    """The training data's field statistics, written into the manifest by the pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int = Field(gt=0, description="training samples the baseline was measured on")
    features: dict[str, FeatureBaseline]
