"""The torch-free core every other part builds on, in four sub-packages named by role.

`cutouts` turns untrusted cutout bytes into the model's input; `sky` fetches cutouts by position;
`data` reads and splits Galaxy10-layout files and names the result columns; `modelfile` is the
exported model: its card, input spec, engine, calibration and OOD score. `files` (one SHA-256, one
atomic write) and `version` serve them all. Nothing here imports torch or any other galmorph part.
"""
