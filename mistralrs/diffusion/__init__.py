"""FLUX image generation written in PyTorch: T5 and CLIP text encoders, the FLUX transformer, the VAE decoder, the
flow-matching Euler schedule and the pipeline that ties them together (`pipeline.FluxImagePipeline`)."""
