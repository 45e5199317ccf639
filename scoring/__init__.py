"""Batch scoring of survey catalogs (`galmorph score`, `galmorph merge`), torch-free."""
