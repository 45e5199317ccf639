"""The Python API (`from galmorph import Classifier`): a consumer of the core beside the server
and the scorer, for notebooks and scripts; no server, no torch."""
