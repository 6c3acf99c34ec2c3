"""Curation (report §4): raw sources -> scenes -> filtered, captioned, clustered Parquet."""
