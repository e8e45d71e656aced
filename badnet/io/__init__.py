"""Input and output: files in, files out.

  keras_io  Keras 2 HDF5 files <-> params, checked against the architecture
  data      CSAW .h5 data files and image files, validated, whole or in chunks
  inputs    a job's model and data files: from the config, or the shipped benchmark
  workdir   the job's folder: checked before any work, written atomically
  tables    CSV files and markdown tables
  report    the pruning defences' results.json/.md and plots
"""
