"""Model families. Importing this package registers every family with `mistralrs.models.registry`."""

from mistralrs.models import gemma, llama, phi2, phi3, starcoder2  # noqa: F401  (each registers its family)
