"""The application: configuration, the one algorithm registry, experiments, bundled data, models,
checkpoints, result files, plots and the ``coopsgd`` command line. Imported on demand (it pulls in
Flax, orbax and matplotlib); nothing below it imports it."""

__all__: list[str] = []  # modules only: import coopsgd.app.<module>
