"""Architectures built from the models: the language model and its layers."""

from lrnnx_jax.architectures.attention import MHA
from lrnnx_jax.architectures.classifier import Classifier, ClassifierBlock, SequencePooling
from lrnnx_jax.architectures.embedding import PositionEmbedding, TokenEmbedding
from lrnnx_jax.architectures.language_model import MIXER_TYPES, Block, GatedMLP, LRNNLMHeadModel
from lrnnx_jax.architectures.lru_unet import LRUUnet

__all__ = ["MHA", "MIXER_TYPES", "Block", "GatedMLP", "LRNNLMHeadModel", "LRUUnet"]
__all__ += ["Classifier", "ClassifierBlock", "SequencePooling", "PositionEmbedding", "TokenEmbedding"]
