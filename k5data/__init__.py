"""Data curation for Kandinsky 5 (report §4): raw sources -> scenes -> filtered, captioned, clustered Parquet.

Library code only (no Dagster): ``k5data.curation.curate.run_curation`` is what both the CLI and the Dagster assets
call.
"""
