"""Evaluation of defect-verification classifiers: metrics, release gates and the HTML evaluation report.

Metrics and gates are pure functions (arrays in, frozen dataclasses out) so that training, the pipeline's
evaluate step and the registry's promotion check all compute exactly the same numbers; only ``report``
does I/O.
"""
