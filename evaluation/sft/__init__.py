"""SFT annotation (report §4.6): questionnaires, the store, consensus and the v1/v2 datasets."""
