"""imgscan jobs: the command line and the Ray jobs (train, score, reduce, demo).

Imports go jobs -> detectors, never back.
"""
