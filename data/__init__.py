"""Shared image data: sources (tar shards, image folders), random access by index, the
deterministic views the teacher and student share, and the embedded demo images.

Every stage reads images through here: extraction (``hgkd.extract``), distillation
(``hgkd.distill``) and evaluation (``hgkd.evaluate``); none of them imports another for data.
"""
