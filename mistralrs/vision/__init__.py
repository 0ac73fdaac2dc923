"""Vision models: image loading (`images`), the contract between the image path and the models (`base`), the
registry (`registry`), and one file per family. Importing this package registers every family."""

from mistralrs.vision import (  # noqa: F401  (imported to register)
    gemma3, idefics2, idefics3, llava, llava_next, minicpmo, mistral3, mllama, phi3v, phi4mm, qwen2_5_vl, qwen2_vl,
)
