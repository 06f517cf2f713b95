"""Production-line integration: inspection results published to the factory's line systems.

What: :mod:`defectops.serving.line.cfx` turns a DefectOps inspection result into the IPC-CFX (IPC-2591)
``CFX.Production.TestAndInspection.UnitsInspected`` message, its CFX envelope and topic, with a JSON Schema
(``schemas/``) written from the standard's message definitions to check what is sent.

Why a subpackage: the line side (message formats, transports, line-specific adapters) grows independently of model
export and Triton serving, and its schemas travel as package data beside the code that emits them.
"""
