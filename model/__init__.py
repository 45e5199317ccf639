"""galmorph model component: Astroformer/CoAtNet and ViT-SPT-LSA in plain PyTorch
(registry.create_model), safetensors+JSON checkpoints (checkpoint), FLOPs (flops), timm weight
mapping (timm_compat) and the verified ONNX export (export). Imports nothing heavy itself."""
