"""The bottom layer: what every package shares and that imports nothing of the project.

Atomic file I/O (:mod:`defectops.core.fsutil`), the defect taxonomy (:mod:`defectops.core.taxonomy`), the run-root
layout as one typed object (:mod:`defectops.core.layout`) and the registry's tag names (:mod:`defectops.core.tags`).
``training``, ``evaluation``, ``registry`` and ``serving`` build on it; ``pipelines`` sits on top of them all. The
layer order is enforced by import-linter (``[tool.importlinter]`` in ``pyproject.toml``).
"""
