"""Calibration and validation data: ``.npz`` files, image folders with preprocessing, the shared data sets."""
