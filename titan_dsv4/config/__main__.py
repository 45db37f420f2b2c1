"""``python -m titan_dsv4.config``: the configuration reference as Markdown (docs/configuration.md)."""

from .manager import reference_markdown

print(reference_markdown(), end="")
