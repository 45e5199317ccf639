"""The torch-free core every other part builds on.

Model card and input spec, colour stretches, cutout decoding (FITS and raster readers,
resampling), the onnxruntime engine, the Galaxy10 HDF5 reader, splits and file utilities.
Nothing here imports torch or any other galmorph package.
"""
