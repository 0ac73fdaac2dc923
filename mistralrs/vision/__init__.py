"""Vision models: image loading (`images`), the contract between the image path and the models (`base`), the
registry (`registry`), and one file per family. Importing this package imports none of them: the registry's
lookups import every family file (each registers itself) on first use, so `import mistralrs` and a text model's
load leave the vision models (and PIL) out."""
