"""yoloq: make Ultralytics YOLO detectors small and fast without losing their accuracy."""

__version__ = "0.1.0"
