"""sbertray: fine-tune sentence-embedding models with Ray Train and batch-embed Parquet with
Ray Data."""

__version__ = "0.1.0"
