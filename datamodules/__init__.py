"""LightningDataModules over the packaged corpora and users' files (installed as ``privtune.datamodules``)."""

from privtune.datamodules.classification import BBCNews, TextClassificationDataModule, TextFile, TweetsSentiment
from privtune.datamodules.federated import FederatedDataModule
from privtune.datamodules.lm_corpus import LMCorpus

__all__ = ["BBCNews", "FederatedDataModule", "LMCorpus", "TextClassificationDataModule", "TextFile", "TweetsSentiment"]
