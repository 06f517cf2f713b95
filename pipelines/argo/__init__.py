"""Argo Workflows: the compiler of the DAG into a WorkflowTemplate (:mod:`.compiler`, pure, built with Hera) and the
REST client of the Argo server that submits and follows workflows (:mod:`.client`).
"""
