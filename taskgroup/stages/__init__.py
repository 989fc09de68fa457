"""Stages: the commands' runners (train, search, study) on top of the libraries (issue 26).

A stage reads and writes run folders, sets up training (threads, pretrained encoder), plots and
prints; the libraries below (``taskgroup.grouping``, ``taskgroup.training``, ...) never import a
stage. Import the stage module itself (``taskgroup.stages.search``): this package imports none of
them, so that a command loads only what it runs.
"""
