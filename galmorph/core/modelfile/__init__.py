"""The exported model file: what it promises and how it runs.

Owns the model card and its contract checks (`contract`), the onnxruntime engine (`engine`),
where a model over 2 GiB lives (`artifact`), temperature calibration (`calibration`) and the
embedding-based OOD score (`ood`). Training writes these facts at export; the server, the scorer
and the Python API read them back.
"""
