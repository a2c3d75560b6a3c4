"""The pieces of the benchmark that ``bench/run.py`` wires together.

``bench/`` is not a package: ``python bench/run.py`` puts ``bench/`` first on
``sys.path``, so these modules import each other as ``harness.<module>``.
"""
