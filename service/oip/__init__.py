"""The Open Inference Protocol v2's side of the server, apart from its routes
(galmorph.service.routers.inference_protocol): the request and response documents (`models`)
and the tensor codec (`codec`: datatypes, the binary tensor data extension, shapes and limits).
The routes hand the decoded tensors to the data plane (galmorph.service.data_plane) like every
other classifying route.
"""
