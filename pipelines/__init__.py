"""The DefectOps DAG: step functions, the local runner and the ``defectops`` command line."""
