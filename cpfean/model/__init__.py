"""The CPFEAN matching model: encoders, pairwise scoring and losses."""

from cpfean.model.config import ModelConfig
from cpfean.model.embeddings import ImageEmbeddings, TextEmbeddings
from cpfean.model.loss import ContrastiveLoss, prominence_loss
from cpfean.model.model import CPFEAN, build_model

__all__ = [
    "CPFEAN",
    "ContrastiveLoss",
    "ImageEmbeddings",
    "ModelConfig",
    "TextEmbeddings",
    "build_model",
    "prominence_loss",
]
