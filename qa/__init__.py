"""Quality assurance of generated birds: species verification, image-quality gates, human-review
sampling and the per-species report (docs/qa.md). Thresholds live in data/qa.yaml."""
