"""The torch-free core every other part builds on, in four sub-packages named by role.

`cutouts` turns untrusted cutout bytes into the model's input; `sky` fetches cutouts by position;
`data` reads and splits Galaxy10-layout files and names the result columns; `modelfile` is the
exported model: its card, engine, calibration and OOD score. The floor serves them all and imports
none of them: `inputspec` (what a model's input is, and the constants behind it), `files` (one
SHA-256, one atomic write) and `version`. `cutouts` imports no sibling; `sky` and `data` import
`cutouts` only; `modelfile` imports `cutouts` and `data`. Nothing here imports torch or any other
galmorph part.
"""
