"""Cutouts: untrusted FITS, PNG and JPEG bytes in, the model's uint8 RGB image out.

Owns the format registry (`formats`), the size limits checked before pixels are read (`limits`),
the readers (`fits_io`, `raster_io`), resampling to the model's pixel scale (`resample`), the
colour stretches (`imaging`) and the one decode path (`decode`) the server, the scorer and the
Python API share. Knows nothing of the sky service, data sets or the model file.
"""
