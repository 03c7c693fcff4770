"""The clinical core: ECG R peaks, cardiac cycles and ED/ES from ECG, masks or images, LV geometry,
volumes and EF, mask propagation, and phantoms with known truth.

NumPy/SciPy/OpenCV only (no torch): the Slicer library and the web front end use it directly.
Main calls: :func:`~EchoFMEngine.clinical.phase.detect_ed_es`,
:func:`~EchoFMEngine.clinical.measure.lv_volume_ml`, :func:`~EchoFMEngine.clinical.propagate.propagate_masks`.
"""
