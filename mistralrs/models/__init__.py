"""Model families. Importing this package registers every family with `mistralrs.models.registry`."""

from mistralrs.models import (  # noqa: F401  (imported to register)
    deepseek,
    gemma,
    llama,
    mixtral,
    phi2,
    phi3,
    phimoe,
    starcoder2,
)
