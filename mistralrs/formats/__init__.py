"""File formats read by more than one floor: the GGUF container (header, metadata, tensor table) and ggml's block
type table. The bottom floor: these modules import numpy and nothing else of the package."""
