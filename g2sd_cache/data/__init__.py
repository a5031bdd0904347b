"""Where images come from and how a view is drawn: the robust folder/tar scan, view sampling and
rendering, labelled sources for stage 2, synthetic images for demos and tests.
"""
