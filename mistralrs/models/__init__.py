"""Model families. Importing this package registers every family with `mistralrs.models.registry`."""

from mistralrs.models import llama  # noqa: F401  (registers the Llama family)
