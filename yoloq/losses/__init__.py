"""Training losses for quantization-aware fine-tuning of detectors."""
