"""Stage 1, generic distillation: extract the teacher's targets into a cache, the elastic epoch plan,
the input paths, the Distiller step and the `train` command.
"""
