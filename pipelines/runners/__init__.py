"""The executors of the DAG: the local runner (in order, in one process, with resume; :mod:`.local`), the per-process
worker a distributed step starts under torchrun (:mod:`.worker`), and the S3 mirror of a run root (:mod:`.remote_root`).
The Argo compiler (:mod:`pipelines.argo`) is the other executor: the same steps as pods.
"""
