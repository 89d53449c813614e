"""The Python-backend scheduler and the pipelines it runs (images, clips), engine-agnostic."""
