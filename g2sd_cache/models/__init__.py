"""The networks: the MAE teacher and G2SD student (mae), the stage-2 classifiers (classifier) and
reading their weights from official or our own files (weights).
"""
