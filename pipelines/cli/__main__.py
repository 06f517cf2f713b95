"""``python -m defectops.pipelines.cli`` is the ``defectops`` command."""

from defectops.pipelines.cli import main

main()
