"""Data sets: loading sources into normalised in-memory splits."""

from koala.data.dataset import DataSource, ImageSplit
from koala.data.sources import SOURCE_NAMES, load_source

__all__ = ["SOURCE_NAMES", "DataSource", "ImageSplit", "load_source"]
