"""Vision models: image loading (`images`), the contract between the image path and the models (`base`), the
registry (`registry`), and one file per family. Importing this package registers every family."""

from mistralrs.vision import gemma3, idefics2, idefics3, llava  # noqa: F401  (imported to register)
